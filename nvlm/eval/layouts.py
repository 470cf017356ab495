"""What ``nvlm eval run --data`` reads per benchmark (paper Sec. 6): each benchmark's official release and its
Hugging Face release, as a file, several shards, or the dataset's root folder. One line per task; the error
for an unknown layout lists them, and ``nvlm/eval/README.md`` says where to get each release.
"""

from __future__ import annotations

HF = "Hugging Face parquet"
LAYOUTS = {
    "vqav2": "the folder holding v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json "
             f"and val2014/ (COCO images); or lmms-lab/VQAv2 ({HF}: data/validation-*.parquet, or the files)",
    "textvqa": f"TextVQA_0.5.1_val.json with train_images/ beside it; or lmms-lab/textvqa ({HF}: "
               "data/validation-*.parquet)",
    "docvqa": "spdocvqa_qas/val_v1.0_withQT.json with spdocvqa_images/ (or the folder holding both); the old "
              f"val/val_v1.0.json with documents/ beside it; or lmms-lab/DocVQA ({HF}: DocVQA/validation-*.parquet)",
    "chartqa": "the ChartQA test/ folder (test_human.json, test_augmented.json, png/) or one of its JSON files; "
               f"or lmms-lab/ChartQA ({HF}: data/test-*.parquet)",
    "ocrbench": "OCRBench.json (also OCRBench/json_files/OCRBench.json in the current repository, or the folder "
                f"holding it) with OCRBench_Images/ beside it or above it; or echo840/OCRBench ({HF})",
    "ai2d": f"lmms-lab/ai2d ({HF}: data/test-*.parquet, a shard, or a JSON/JSONL export), or VLMEvalKit's "
            "AI2D_TEST.tsv",
    "realworldqa": f"xai-org/RealworldQA or lmms-lab/RealWorldQA ({HF}: data/test-*.parquet, a shard, or a "
                   "JSON/JSONL export)",
    "mmmu": f"MMMU/MMMU ({HF}: the root folder, a subject folder, or */validation-*.parquet), or JSON/JSONL "
            "exports of validation files",
    "mathvista": "the MathVista repository's data/ folder (testmini.json, query.json, images/) or testmini.json; "
                 f"or AI4Math/MathVista ({HF}: data/testmini-*.parquet)",
    "mmlu": "the MMLU data/ folder (dev/*_dev.csv and test/*_test.csv); or cais/mmlu "
            f"({HF}: the root folder or all/ with test-*.parquet and dev-*.parquet)",
    "gsm8k": f"grade_school_math/data/test.jsonl; or openai/gsm8k ({HF}: main/test-*.parquet)",
    "math": "the MATH test/ folder (one folder of JSON files per subject); MATH-500's test.jsonl; or "
            f"EleutherAI/hendrycks_math ({HF}: */test-*.parquet)",
    "humaneval": f"HumanEval.jsonl or HumanEval.jsonl.gz; or openai/openai_humaneval ({HF})",
    "demo": "a held-out JSONL written by nvlm demo (e.g. runs/demo/data/test/color.jsonl) or that test/ folder",
}  # fmt: skip
