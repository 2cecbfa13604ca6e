"""`tunesmith embed train` (tunesmith/embed/train.py) on a tiny BERT: the run directory, before/after scores,
best checkpoint, export that sentence-transformers loads (1e-5), the LoRA adapter in peft, exact resume, the
same-document mask on every batch, Matryoshka per dimension, a worse model not exported."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import ENCODER_WORDS, assert_resumes_bit_exact, build_tiny_encoder, killed_after
from tunesmith.embed.config import load_embed_config
from tunesmith.errors import UserError

WORDS = [w for w in ENCODER_WORDS if len(w) > 3]


def write_pairs(path, documents: int = 24, chunks: int = 2, questions: int = 2, seed: int = 0):
    """Pairs whose queries share words with their chunk: 2 chunks per document, 2 questions per chunk."""
    rng = random.Random(seed)
    rows = []
    for d in range(documents):
        for _ in range(chunks):
            words = rng.sample(WORDS, 4)
            passage = "the " + " ".join(words) + " in the " + rng.choice(WORDS)
            for _ in range(questions):
                rows.append({"query": "what " + " ".join(rng.sample(words, 2)) + "?", "positive": passage,
                             "doc_id": f"d{d}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_encoder(folder):
    """conftest's tiny BERT with a tokenizer that knows its words: under transformers 5,
    BertTokenizerFast(vocab_file=...) loads only the special tokens (every word becomes [UNK]), so nothing could
    be learned; vocab= as a mapping loads them all."""
    from transformers import BertTokenizerFast

    folder = build_tiny_encoder(folder)
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").split()
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    return tiny_encoder(root / "enc"), write_pairs(root / "pairs.jsonl")


def config(files, run_dir, *overrides):
    encoder, pairs = files
    return load_embed_config(None, [f"model.name_or_path={encoder}", f"data.train={pairs}", "data.test_split=0.25",
                                    "train.max_steps=8", "train.batch_size=8", "train.eval_every=4",
                                    "train.warmup_steps=0", "method.name=full", "train.lr=2e-3", "eval.bootstrap=50",
                                    f"output.dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):
    from tunesmith.embed.train import train_embedder

    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, train_embedder(config(files, run_dir, "objective.matryoshka_dims=[32,16]"))


def test_full_run_scores_before_after_and_exports(full_run):
    run_dir, summary = full_run
    full = summary["evaluation"]["full"]
    assert set(full) == {"before", "after", "difference"}
    assert full["after"]["ndcg@10"]["value"] > full["before"]["ndcg@10"]["value"]  # it learned the word overlap
    diff = full["difference"]["mrr@10"]
    assert diff["value"] == pytest.approx(full["after"]["mrr@10"]["value"] - full["before"]["mrr@10"]["value"])
    assert diff["ci"][0] <= diff["value"] <= diff["ci"][1]
    assert "16" in summary["evaluation"] and "after" in summary["evaluation"]["16"]  # Matryoshka, per dimension
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "val_ndcg@10" in r] == [4, 8]
    assert records[-1]["test_after_ndcg@10"] == full["after"]["ndcg@10"]["value"] and "test_after_mrr@10_d16" in records[-1]
    assert load_embed_config(run_dir / "config.yaml").method.name == "full"  # the resolved config, reloadable
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert summary["best_step"] == best["step"] and best["val_ndcg@10"] == max(
        r["val_ndcg@10"] for r in records if "val_ndcg@10" in r)
    assert "## test set, whole embedding" in (run_dir / "report.md").read_text()
    assert summary["export_max_abs_diff"] <= 1e-5 and summary["adapter"] is None


def test_exported_folder_loads_in_sentence_transformers(full_run, files):
    st = pytest.importorskip("sentence_transformers")
    from tunesmith.embed.encoder import load_encoder

    run_dir, _ = full_run
    texts = ["what river bank?", "the money loan in the city", "snow"]
    ours = load_encoder(str(run_dir / "model")).encode(texts)
    theirs = st.SentenceTransformer(str(run_dir / "model"), device="cpu").encode(texts, convert_to_tensor=True)
    assert (ours - theirs).abs().max() <= 1e-5
    base = load_encoder(str(files[0])).encode(texts)
    assert (ours - base).abs().max() > 1e-3  # it is the tuned model, not the base copied


@pytest.mark.parametrize("targets", ["all-linear", "[query,key,value,dense,word_embeddings]"])
def test_lora_adapter_and_merged_folder_both_load(files, tmp_path, targets):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    from tunesmith.embed.encoder import load_encoder, pool
    from tunesmith.embed.train import train_embedder

    summary = train_embedder(config(files, tmp_path, "method.name=lora", "method.r=4", "train.lr=1e-2",
                                    "train.max_steps=4", "eval.select_best=false", "eval.export_if_worse=true",
                                    f"method.target_modules={targets}"))
    assert summary["adapter"] and json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "task_type"] == "FEATURE_EXTRACTION"
    texts = ["what river bank?", "the money loan in the city"]
    exported = load_encoder(str(tmp_path / "model"))
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(str(files[0])), str(tmp_path / "adapter")).eval()
    features = exported.tokenize(texts)
    with torch.no_grad():
        vectors = pool(model(**features).last_hidden_state, features["attention_mask"], ("mean",))
    assert (torch.nn.functional.normalize(vectors, dim=-1) - exported.encode(texts)).abs().max() <= 1e-5
    base = load_encoder(str(files[0]))
    assert (exported.encode(texts) - base.encode(texts)).abs().max() > 1e-4
    # LoRA on the word embeddings (docs/embeddings.md, the demo): peft wraps the table, and the merged table moved
    tables = [m.model.embeddings.word_embeddings.weight for m in (exported, base)]
    embedded = "word_embeddings" in targets
    assert isinstance(model.base_model.model.embeddings.word_embeddings, peft.tuners.lora.Embedding) == embedded
    assert ((tables[0] - tables[1]).abs().max() > 1e-4) == embedded


def test_resume_is_bit_exact(files, tmp_path, monkeypatch):
    from tunesmith.embed.train import train_embedder
    from tunesmith.files import read_safetensors
    from tunesmith.train.checkpoint import complete_checkpoints

    def run(run_dir, monkeypatch, resume=False, kill_after=None):
        cfg = config(files, run_dir, "method.name=lora", "method.r=4", "method.dropout=0.1", "train.max_steps=4",
                     "objective.cached=true", "objective.chunk_size=3",  # GradCache in the loop, dropout replayed
                     "train.save_every=2", "eval.before_after=false", f"train.resume={str(resume).lower()}")
        with killed_after(monkeypatch, kill_after):
            train_embedder(cfg)
        return read_safetensors(complete_checkpoints(run_dir)[-1] / "trainable.safetensors", "checkpoint")

    records = assert_resumes_bit_exact(run, tmp_path, monkeypatch)
    assert any("val_ndcg@10" in r for r in records)


def test_every_batch_is_shuffled_and_masks_same_document(files):
    """Every micro-batch of two epochs: no passage of a query's own document (other than its positive) is left
    in its softmax, and the order is not the file's."""
    from tunesmith.embed.data import read_pairs
    from tunesmith.embed.encoder import load_encoder
    from tunesmith.embed.objective import make_objective
    from tunesmith.train.loop import BatchSource, Schedule

    cfg = config(files, "unused")
    pairs = read_pairs(files[1])
    document_of = {p.positive: p.doc_id for p in pairs}
    objective = make_objective(load_encoder(str(files[0])), cfg.objective, document_of)
    schedule = Schedule.from_config(len(pairs), cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"epochs": 2.0, "max_steps": 0})}))
    source = BatchSource(pairs, schedule, 0, 0, torch.device("cpu"), objective=objective)
    orders, masked = [], 0
    for k in range(schedule.total_steps):
        epoch, position = divmod(k, schedule.batches_per_epoch)
        rows = [pairs[i] for i in source.epoch_order(epoch)[position * 8:(position + 1) * 8]]
        batch = source.micro_batch(k)
        orders.append([p.query for p in rows])
        assert batch["exclude"].shape == (len(rows), len(rows))
        for i, q in enumerate(rows):
            for j, p in enumerate(rows):
                same = document_of[p.positive] == q.doc_id and j != i
                assert bool(batch["exclude"][i, j]) == same, (k, i, j)
                masked += same
    assert masked > 0  # the data do put same-document passages side by side
    assert [q for o in orders[:schedule.batches_per_epoch] for q in o] != [p.query for p in pairs]


def test_worse_model_is_reported_and_not_exported(files, tmp_path, monkeypatch, caplog):
    import tunesmith.embed.train as embed_train

    monkeypatch.setattr(embed_train, "_worse_than_base", lambda scores: True)
    quick = ("train.max_steps=1", "data.val_split=0", "data.test_split=0")
    summary = embed_train.train_embedder(config(files, tmp_path, *quick))
    assert summary["worse_than_base"] and summary["exported"] is None and not (tmp_path / "model").exists()
    assert "BELOW its base" in caplog.text
    summary = embed_train.train_embedder(config(files, tmp_path / "b", *quick, "eval.export_if_worse=true"))
    assert summary["exported"] and (tmp_path / "b" / "model" / "modules.json").is_file()


def test_config_errors_name_the_embed_keys():
    with pytest.raises(UserError, match="unknown key 'objective.temperature'.*allowed here: cached, chunk_size"):
        load_embed_config(None, ["objective.temperature=0.05"])
    with pytest.raises(UserError, match="matryoshka_dims"):
        load_embed_config(None, ["objective.matryoshka_dims=[64,64]"])
    assert load_embed_config(None, ["objective.matryoshka_dims=[16,64,32]"]).objective.matryoshka_dims == [64, 32, 16]


def test_cli_help_lists_the_schema_and_bad_keys_exit_2(capsys, tmp_path):
    from tunesmith.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for key in ("objective.matryoshka_dims", "objective.mask_same_document", "eval.select_best",
                "eval.export_if_worse", "data.val_split", "method.name", "train.resume"):
        assert key in out
    assert main(["embed", "train", "objective.bogus=1"]) == 2
    assert "unknown key 'objective.bogus'" in capsys.readouterr().err
    for command in ("pairs", "mine", "demo"):
        with pytest.raises(SystemExit):
            main(["embed", command, "--help"])
        assert "--out" in capsys.readouterr().out


def test_matryoshka_loss_sums_truncated_renormalised_and_cached_agrees():
    from tunesmith.objectives.contrastive import (ContrastiveBatch, cached_contrastive_loss, contrastive_loss,
                                                 nested_contrastive_loss)

    torch.manual_seed(0)
    q, p = torch.randn(4, 8), torch.randn(6, 8)
    positive, exclude = torch.arange(4), torch.zeros(4, 6, dtype=torch.bool)
    exclude[0, 5] = True
    by_hand = sum(torch.nn.functional.cross_entropy(
        (20 * torch.nn.functional.normalize(q[:, :d], dim=-1) @ torch.nn.functional.normalize(p[:, :d], dim=-1).T)
        .masked_fill(exclude, float("-inf")), positive) for d in (8, 4, 2))
    assert torch.allclose(nested_contrastive_loss(q, p, positive, exclude, 20.0, [8, 4, 2]), by_hand, atol=1e-6)
    assert torch.equal(nested_contrastive_loss(q, p, positive, exclude), contrastive_loss(q, p, positive, exclude))
    # GradCache over nested dimensions: the same loss and gradients as the plain nested loss
    table = torch.nn.Embedding(10, 8)
    embed = lambda idx: table(torch.tensor(idx))  # noqa: E731 (row i of the table is text i's embedding)
    plain = nested_contrastive_loss(embed(list(range(4))), embed(list(range(4, 10))), positive, exclude, 20.0, [8, 4])
    plain.backward()
    expected, table.weight.grad = table.weight.grad.clone(), None
    cached = cached_contrastive_loss(embed, ContrastiveBatch(list(range(4)), list(range(4, 10)), positive, exclude),
                                     20.0, chunk_size=3, dims=[8, 4])
    cached.backward()
    assert torch.allclose(cached, plain, atol=1e-6) and torch.allclose(table.weight.grad, expected, atol=1e-6)
