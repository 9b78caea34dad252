"""Front-ends: the merge command line and JSON configs (``merge``), mergekit recipes (``recipe``), the LoRA fold
(``lora``); ``common`` holds what they share."""
