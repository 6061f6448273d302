"""Writing outputs: one crash-safe folder (``folder``), model folders (``model``), PEFT adapters (``adapter``)."""
