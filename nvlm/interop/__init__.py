"""Interop with NVIDIA's released NVLM-D-72B layout, original InternViT folders and transformers' InternVL.

    nvlm.from_pretrained("/weights/NVLM-D-72B")                  # the release folder, as downloaded
    nvlm.interop.convert.convert(src, dst, to="ours")            # → our format (streamed); to="release": back
    nvlm.build("D", llm=..., vision="/weights/InternViT-300M-448px-V2_5")   # an original InternViT folder

keymap.py   the weight-name maps (ours ↔ release, ours ↔ InternVLForConditionalGeneration, InternViT names)
internvl.py our NVLM-D as transformers' InternVLForConditionalGeneration (parity test, ``nvlm bench --vs hf``)
internvit.py original InternViT configs, dummy heads, original folders as a vision tower
release.py  the release's config.json mapped to ours; loading the release folder directly
convert.py  `nvlm convert`: release ↔ ours, tensor by tensor
shards.py   safetensors read and written one tensor at a time
replica.py  tiny release-layout folders for tests

No file of a release or InternViT folder is ever imported or run (their ``auto_map`` is ignored).
"""
