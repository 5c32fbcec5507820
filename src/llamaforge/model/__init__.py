"""The model: `hf/` (the two self-contained Hugging Face files that travel with the weights),
`io.py` (build, save and load Hugging Face folders), `convert.py` (stock Llama / GPT-2 and back)."""
