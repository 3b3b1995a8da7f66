"""Long-context evaluation, computed the way the field computes it (sources in docs/eval.md).

    ppl         perplexity vs length: HF sliding window with stride, or YaRN's truncate mode
    passkey     the Landmark/YaRN/LongLoRA passkey prompt, first-integer scoring
    niah        needle in a haystack, substring scoring, length x depth heatmap
    ruler       RULER's synthetic tasks, string_match_all/part, effective context length
    genmetrics  BLEU (sacrebleu) and ROUGE (rouge-score) of generations
    prompting   sizing prompts to a token budget, per-cell random streams, greedy answers
    plots       line plots and the red-to-green heatmap
    lm_eval_adapter  the `longctx` model for lm-evaluation-harness (optional extra)
    report      results.json layout, and one Markdown/HTML page over several runs
    command     `longctx eval {ppl,passkey,niah,ruler,gen}`

Submodules are imported on use, so `import longctx.eval` stays cheap.
"""
