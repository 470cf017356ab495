"""Energon Metadataset blends as data sources: weights, nesting, epochized shares, refusals, the shipped paper
blends (structure and coverage of Tables 4 and 6, without the data), and a tiny blend of real data that trains.

python -m pytest tests/test_data_blends.py -q
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from data_fixtures import write_cauldron_parquet, write_jsonl, write_shards

from nvlm.data.sources import kind_of, open_mixture, open_sources
from nvlm.data.sources.metadataset import BLENDS, leaves, shipped_blends
from nvlm.errors import UserError

V2 = "__module__: megatron.energon\n__class__: MetadatasetV2\n"


@pytest.fixture(autouse=True)
def _index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVLM_INDEX_DIR", str(tmp_path / "index"))


@pytest.fixture
def data(tmp_path):
    """Three tiny real sources of different kinds under one root: JSONL (6), Cauldron Parquet (4), shards (3)."""
    write_jsonl(tmp_path / "jsonl", 6)
    write_cauldron_parquet(tmp_path, 4)
    write_shards(tmp_path, 3, shards=1)
    return tmp_path


def write(path, text):
    path.write_text(text)
    return str(path)


def test_weights_nest_as_energon_weighs_them(data):
    write(data / "inner.yaml", V2 + "splits:\n  train:\n    blend:\n"
          "      - {weight: 1, path: cauldron}\n      - {weight: 3, path: wds/00000.tar}\n")  # fmt: skip
    top = write(data / "blend.yaml", V2 + "splits:\n  train:\n    blend:\n"
                "      - {weight: 1, path: jsonl/conv.jsonl, subflavors: {augmentation: false}}\n"
                "      - {weight: 1, path: inner.yaml}\n  val:\n    path: cauldron\n")  # fmt: skip
    assert kind_of(top) == "metadataset"
    shares = {leaf.name: leaf.share for leaf in leaves(top)}
    assert shares == {"jsonl/conv.jsonl": 0.5, "cauldron": 0.125, "wds/00000.tar": 0.375}
    assert leaves(top)[0].subflavors == {"augmentation": False}
    sources = open_sources(top, weight=2.0)  # the entry's weight is the whole blend's
    assert {s.name: s.weight for s in sources} == {
        "blend/jsonl/conv.jsonl": 1.0,
        "blend/cauldron": 0.25,
        "blend/wds/00000.tar": 0.75,
    }
    assert [len(s.records) for s in sources] == [6, 4, 3]


def test_blend_epochized_shares_follow_repetitions_times_records(data):
    (data / "sub").mkdir()  # a nested file naming one dataset, relative to its own folder
    write(data / "sub" / "one.yaml", V2 + "splits:\n  train:\n    path: ../jsonl/conv.jsonl\n")
    top = write(data / "ep.yaml", V2 + "splits:\n  train:\n    blend_epochized:\n"
                "      - {repetitions: 2, path: sub/one.yaml}\n"
                "      - {repetitions: 0.5, path: cauldron}\n")  # fmt: skip
    weights = {s.name: s.weight for s in open_sources(top)}
    assert weights == pytest.approx({"ep/jsonl/conv.jsonl": 12 / 14, "ep/cauldron": 2 / 14})


def test_the_older_metadataset_form_is_read(data):
    top = write(data / "v1.yaml", "__module__: megatron.energon\n__class__: Metadataset\ndatasets:\n"
                "  - {weight: 1, path: cauldron, subflavors: {augmentation: false}}\n"
                "  - {weight: 1, path: jsonl/conv.jsonl}\n")  # fmt: skip
    assert [leaf.share for leaf in leaves(top)] == [0.5, 0.5]


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "splits:\n  train:\n    blend:\n      - {weight: 1, path: cauldron, colour: red}\n",
            "unknown key(s) ['colour']",
        ),
        (
            "splits:\n  train:\n    blend:\n      - {weight: 1, path: cauldron, aux: {a: b}}\n",
            "does not read Energon's",
        ),
        ("splits:\n  train:\n    blend:\n      - {weight: -1, path: cauldron}\n", "weight must be a number >= 0"),
        ("splits:\n  train:\n    blend:\n      - {repetitions: 2, path: cauldron}\n", "unknown key(s) ['repetitions']"),
        ("splits:\n  val:\n    path: cauldron\n", "no splits.train"),
        ("splits:\n  train:\n    blend: []\n", "non-empty blend"),
        ("split:\n  train: {}\n", "unknown key(s) ['split']"),
        ("splits:\n  train:\n    blend:\n      - {weight: 1, path: loop.yaml}\n", "includes itself"),
        ("splits:\n  train:\n    blend:\n      - {weight: 1, path: nowhere}\n", "1 of its 1 datasets not found"),
    ],
)
def test_blend_mistakes_are_named(data, body, message):
    path = write(data / "loop.yaml", V2 + body)
    with pytest.raises(UserError, match=re.escape(message)):
        open_sources(path)


def test_a_yaml_that_is_not_a_metadataset_is_refused(tmp_path):
    with pytest.raises(UserError, match="must be an Energon Metadataset"):
        open_sources(write(tmp_path / "run.yaml", "model: {arch: D}\n"))


# The paper's datasets (Tables 4 and 6, and the text-only SFT sets of §5.3), as the blend files must name them:
# an entry, or a line saying where it is not public or not readable.
TABLE_4 = """COCO CC3M SBU LAION-115M VQAv2 Visual-Genome DVQA Docmatix OCR-VQA COCO-Text TextOCR ReCTs RRC-ArT RRC-
LSVT RCTW synthdog-en pdfa-eng-wds CLEVR-Math"""
TABLE_6 = """COCO TextCaps ShareGPT-4o VQAv2 Visual-Genome TallyQA Visual7W VizWiz OK-VQA A-OKVQA GQA Super-CLEVR
Raven VSR DVQA PlotQA MMC-Instruction ChartQA InfographicVQA FigureQA IconQA Chart2Text Diagram-
Image2Text WikiTableQuestions RobuT WikiSQL SQA HiTab DocVQA Docmatix DUDE VisualMRC TAT-DQA UReader-IE
UReader-KG UReader-QA OCR-VQA TextVQA ST-VQA ScreenQA SlideQA PDF-VQA VQA-CD VQAonBD POIE SROIE ORAND
EST-VQA FUNSD SQuAD WordArt IAM IIIT5K HME100K synthdog-en Bentham-QA HW-SQuAD WebSight ChromeWriting
K12-Printing COCO-Text TextOCR ReCTS pdfa-eng-wds CLEVR-Math GeoQA+ Geometry3K TabMWP GSM8K MetaMathQA
MAVIS-Data-Engine MAVIS-Manual-Collection Geo170K-Align Geo170K-QA GeoMVerse GEOS UniGeo AI2D ScienceQA
TQA ArXivQA textbook-data LRV-Instruction LLaVA-158K LLaVAR SlimOrca ShareGPT EvolInstruct GPTeacher
AlpacaGPT4 UltraInteract OrcaMathWordProblems MathInstruct MetaMath GlaiveCodeAssistant Magicoder
WizardCoder"""


def squash(text: str) -> str:
    return re.sub(r"[^a-z0-9+]", "", text.lower())


@pytest.mark.parametrize("name, table", [("nvlm-pretrain", TABLE_4), ("nvlm-sft", TABLE_6)], ids=["table4", "table6"])
def test_shipped_blends_name_every_paper_dataset(name, table, monkeypatch, tmp_path):
    assert name in shipped_blends()
    monkeypatch.setenv("NVLM_DATA_ROOT", str(tmp_path))
    found = leaves(f"blend:{name}")
    assert len(found) >= (5 if name == "nvlm-pretrain" else 50)
    assert all(leaf.epochized and 0 < leaf.share <= 1 for leaf in found)  # the documented rule: repetitions ≤ 1
    assert all(leaf.path.startswith(str(tmp_path)) for leaf in found)  # under the data root, nowhere else
    assert len({leaf.name for leaf in found}) == len(found)
    text = (BLENDS / f"{name}.yaml").read_text()
    assert "Not public, or not in a layout nvlm reads" in text and "Weights: the paper gives none" in text
    missing = [d for d in table.split() if squash(d) not in squash(text)]
    assert not missing, f"{name}.yaml does not mention {missing}"
    with pytest.raises(UserError, match="datasets not found"):  # no data downloaded: one clear error
        open_sources(f"blend:{name}")


def test_a_shipped_blend_needs_a_data_root(monkeypatch):
    monkeypatch.delenv("NVLM_DATA_ROOT", raising=False)
    with pytest.raises(UserError, match="NVLM_DATA_ROOT"):
        leaves("blend:nvlm-sft")
    with pytest.raises(UserError, match="there are: nvlm-pretrain, nvlm-sft"):
        leaves("blend:nvlm-nothing")


def test_a_tiny_blend_of_real_data_trains(backbones, data, tmp_path):
    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    top = write(data / "tiny.yaml", V2 + "splits:\n  train:\n    blend:\n"
                "      - {weight: 2, path: jsonl/conv.jsonl}\n      - {weight: 1, path: cauldron}\n"
                "      - {weight: 1, path: wds/00000.tar}\n")  # fmt: skip
    cfg = RunConfig.from_dict({
        "model": {"arch": "D", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": [{"path": top}], "max_seq_len": 256},
        "train": {"max_steps": 3, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3,
                  "min_lr": 1e-4}})  # fmt: skip
    result = Trainer(cfg, tmp_path / "run", log=lambda *a, **k: None).run()
    assert result.steps == 3 and not result.interrupted
    assert result.counts["used"] == 6 and result.counts["used_with_images"] == 6
    mix = open_mixture([SimpleNamespace(path=top, name=None, weight=1.0, image_root=None)], seed=0)
    assert [s.name for s in mix.sources] == ["tiny/jsonl/conv.jsonl", "tiny/cauldron", "tiny/wds/00000.tar"]


def test_inspect_lists_a_shipped_blends_datasets_and_which_are_there(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "the_cauldron").mkdir()
    (write_cauldron_parquet(tmp_path, 4)).rename(tmp_path / "the_cauldron" / "vqav2")  # one dataset downloaded
    env = {**os.environ, "NVLM_INDEX_DIR": str(tmp_path / "index")}
    cmd = [sys.executable, "-m", "nvlm.data.cli", "inspect", "blend:nvlm-pretrain", "--data-root", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "a blend of 6 datasets, 1 present" in out.stdout
    assert "the_cauldron/vqav2  x1  4 records, 100.00% of the blend" in out.stdout
    assert "the_cauldron/dvqa  x1  missing" in out.stdout
    assert "assistant: cauldron 0" in out.stdout  # then the present dataset inspected as usual
