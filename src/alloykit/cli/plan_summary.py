"""What ``alloykit plan`` prints by default: the plan's jobs grouped, not one line per tensor.

Jobs that do the same thing (same method or copy, same inputs, same output dtype, same
resolved parameters) form one line, with the layers they cover as ranges and the bytes
they write. When layer gradients or filters give too many distinct parameter sets to
list, jobs are grouped by everything but the values, and each parameter shows its range.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from alloykit.plan.planner import Plan, TensorJob
from alloykit.roles import role_of

#: above this many distinct parameter sets, parameters are shown as ranges
MAX_GROUPS = 8
NAMES_SHOWN = 3


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def job_params(job: TensorJob) -> dict[str, Any]:
    """A job's resolved parameters: shared ones by name, per-model ones as a list over the inputs."""
    shared = job.params.model_dump(by_alias=True) if job.params is not None else {}
    per = [m.model_dump(by_alias=True) for m in job.model_params]
    out = dict(shared)
    for key in (per[0] if per else {}):
        out[key] = [p[key] for p in per]
    return out


def _structure(plan: Plan, job: TensorJob) -> str:
    what = "copy" if job.copy else plan.method.name
    src = ", ".join(f"[{s.model}]" for s in job.sources)
    base = f" base=[{job.base.model}]" if job.base else ""
    stats = f" stats=({', '.join(f'[{s.model}]' for s in job.stats)})" if job.stats else ""
    return f"{what}({src}){base}{stats} {str(job.out_dtype).removeprefix('torch.')}"


def ranges(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    nums = sorted(set(numbers))
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


@dataclass
class _Group:
    structure: str
    params: list[dict[str, Any]] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    others: list[str] = field(default_factory=list)
    count: int = 0
    out_bytes: int = 0

    def add(self, job: TensorJob, params: dict[str, Any]) -> None:
        self.count += 1
        self.out_bytes += job.out_bytes
        self.params.append(params)
        layer = (job.role or role_of(job.name)).layer
        if layer is not None:
            self.layers.append(layer)
        else:
            self.others.append(job.name)

    def params_text(self) -> str:
        parts = []
        for key in self.params[0] if self.params else {}:
            values = [p[key] for p in self.params]
            distinct = list(dict.fromkeys(map(repr, values)))
            if len(distinct) == 1:
                parts.append(f"{key}={_fmt(values[0])}")
            else:
                parts.append(f"{key}={_span(values)}")
        return " ".join(parts)

    def line(self) -> str:
        where = []
        if self.layers:
            where.append(f"layer{'s' if len(set(self.layers)) > 1 else ''} {ranges(self.layers)}")
        if self.others:
            shown = ", ".join(self.others[:NAMES_SHOWN])
            more = f" +{len(self.others) - NAMES_SHOWN} more" if len(self.others) > NAMES_SHOWN else ""
            where.append(shown + more)
        params = self.params_text()
        tensors = f"{self.count} tensor{'s' if self.count != 1 else ''}"
        return f"  {self.structure}{' ' + params if params else ''}\n      {tensors}: {'; '.join(where)}; writes {_size(self.out_bytes)}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _span(values: list[Any]) -> str:
    """Differing values of one parameter across the grouped jobs: 'min..max' (per input for lists)."""
    if len(set(map(repr, values))) == 1:
        return _fmt(values[0])
    if all(isinstance(v, list) for v in values):
        return "[" + ", ".join(_span([v[i] for v in values]) for i in range(len(values[0]))) + "]"
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) == len(values):
        return f"{_fmt(min(nums))}..{_fmt(max(nums))}"
    return "{" + ", ".join(dict.fromkeys(_fmt(v) for v in values)) + "}"


def _group(plan: Plan, by_values: bool) -> list[_Group]:
    groups: dict[tuple, _Group] = {}
    for job in plan.jobs:
        params = {} if job.copy else job_params(job)
        structure = _structure(plan, job)
        key = (structure, repr(params) if by_values else tuple(params))
        groups.setdefault(key, _Group(structure)).add(job, params)
    return list(groups.values())


def summary_lines(plan: Plan) -> list[str]:
    lines = [f"method: {plan.method.name}   seed: {plan.seed}   tensors: {len(plan.jobs)}   "
             f"read: {_gb(plan.in_bytes)}   write: {_gb(plan.out_bytes)}", "inputs:"]
    base = {j.base.model for j in plan.jobs if j.base}
    lines += [f"  [{i}] {label}" + (" (base)" if i in base else "") for i, label in enumerate(plan.labels)]
    groups = _group(plan, by_values=True)
    collapsed = len(groups) > MAX_GROUPS
    if collapsed:
        groups = _group(plan, by_values=False)
    lines.append("jobs, grouped by method, inputs and parameters" + (" (parameters vary by tensor: min..max)" if collapsed else "") + ":")
    for g in groups:
        lines.append(g.line())
    lines.append("one line per tensor: alloykit plan RECIPE --all (or --json)")
    return lines
