"""CEPrompt itself: the CLIP description and tower passes, the scoring head, prompts, EVA (stage 1) and CAT
(stage 2). Imports nothing from the engine, the verbs, the server or the CLI."""
