"""What users run a model for: classifying files (`classifier`) and dataset splits
(`split_predictions`), attention maps (`explain`), few-shot evaluation (`fewshot`), the HTTP
server (`serving`) and the demo."""
