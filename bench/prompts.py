"""The fixed prompt set (short, varied lengths, like chat turns). The weights are random, so only the
token counts matter; the same prompts go to the baseline and to the pipeline."""

PROMPTS = [
    "Once upon a time there was a little robot who",
    "The quick brown fox jumps over the lazy dog and then",
    "In a small village at the edge of the forest, an old baker",
    "Explain why the sky is blue in simple words:",
    "Write a short poem about the sea.",
    "The three most important things to know about pipelines are",
    "Dear diary, today I learned that",
    "Recipe for a simple tomato soup: first,",
    "The history of the printing press begins in",
    "Q: What is the capital of France? A:",
    "She opened the door slowly and saw",
    "A cluster of tiny computers can",
    "def fibonacci(n):",
    "The weather forecast for tomorrow says",
    "My favourite book is about a detective who",
    "Ten reasons to learn a second language: one,",
]
