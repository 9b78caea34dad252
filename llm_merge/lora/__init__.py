"""LoRA adapters folded into their base: options (``options``), the adapter (``adapter``), the checked fold plan
(``plan``) and its execution (``fold``)."""
