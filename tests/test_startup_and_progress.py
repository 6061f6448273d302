"""Start-up imports only what a command needs; long work shows progress; library messages go through logging."""

import io
import json
import logging
import subprocess
import sys
import threading

from alloykit.progress import Progress, show_logs

PROBE = """
import json, sys
from alloykit.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _imports(*args):
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=300)
    last = json.loads(r.stderr.strip().splitlines()[-1])
    return last["code"], set(last["modules"])


def test_help_imports_no_torch():
    code, mods = _imports("--help")
    assert code == 0
    assert "torch" not in mods and "numpy" not in mods and "pydantic" not in mods
    assert not any(m.startswith(("alloykit.methods", "alloykit.plan.planner", "alloykit.merge")) for m in mods)


def test_validate_imports_no_feature_or_optional_extra(family, tmp_path):
    _, tunes = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {t}\n    parameters: {{weight: 1.0}}\n" for t in tunes))
    code, mods = _imports("validate", recipe)
    assert code == 0
    heavy = ("transformers", "matplotlib", "peft", "scipy", "ray", "gguf", "huggingface_hub",
             "alloykit.stats.collect", "alloykit.lora", "alloykit.search", "alloykit.eval", "alloykit.analysis")
    assert not [m for m in mods if m.startswith(heavy)]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere():
    tty = FakeTerminal()
    p = Progress("merge", 4, unit="tensors", total_bytes=4_000_000, stream=tty, every=0)
    for _ in range(4):
        p.update(1, 1_000_000)
    frames = tty.getvalue().split("\r")[1:]
    assert len(frames) == 4 and frames[0].startswith("merge [1/4 tensors] |######")
    assert frames[-1].startswith("merge [4/4 tensors] |" + "#" * 24 + "| 0.00/0.00 GB") and frames[-1].endswith("\n")
    assert all(not f.endswith("\n") for f in frames[:-1])  # redrawn in place

    log = io.StringIO()
    p = Progress("gram", 10, unit="samples", stream=log, every=3600)
    for _ in range(10):
        p.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gram [10/10 samples] ") and "samples/s" in lines[0]  # rate-limited

    seen = []
    p = Progress("adamerging", 3, seen.append, unit="steps", every=0)
    for _ in range(3):
        p.update()
    assert [s.split("]")[0] for s in seen] == ["adamerging [1/3 steps", "adamerging [2/3 steps", "adamerging [3/3 steps"]

    quiet = io.StringIO()
    p = Progress("merge", 2, stream=quiet, enabled=False)
    p.update(2)
    assert quiet.getvalue() == ""


def test_progress_counts_from_many_threads():
    out = io.StringIO()
    p = Progress("merge", 800, stream=out, every=3600)
    threads = [threading.Thread(target=lambda: [p.update(1) for _ in range(100)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.done == 800 and out.getvalue().count("[800/800 items]") == 1


def test_the_cli_shows_library_messages_on_stderr(capsys):
    show_logs()
    logging.getLogger("alloykit.merge").info("resuming: 2 of 3 shards already complete")
    logging.getLogger("alloykit.stats.collect").debug("not shown")
    assert capsys.readouterr().err == "alloykit: resuming: 2 of 3 shards already complete\n"
