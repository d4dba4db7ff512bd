"""Node-local data on Flower: nodes that train on their own files, the label list they agree on, the counts that
weigh them, the global model scored on their held-out parts, pinned models and versions checked before round 1;
and that nothing of a node's data but counts and scores leaves it."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from florana.config import RunConfig
from florana.data import Examples, relabel
from florana.errors import FloranaError
from florana.federation.engine import read_metrics
from florana.flower.handshake import model_hash, version_problem, versions
from florana.flower.nodedata import agree_labels, check_count, node_data_of
from tiny import BAD, FILL, GOOD, tiny_bert

MID = "okay average middling fair mixed plain".split()


def tiny_bert3(root: Path, seed: int = 0) -> Path:
    """tests/tiny.py's tiny BERT with a three-class head (pos, neg, meh); another seed gives other weights."""
    out = root / f"tiny-bert3-{seed}"
    if not out.exists():
        torch.manual_seed(seed)
        BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=48,
                                                 max_position_embeddings=64, num_labels=3)).save_pretrained(out)
        AutoTokenizer.from_pretrained(tiny_bert(root)).save_pretrained(out)
    return out


def reviews_csv(path: Path, n: int, mix: dict[str, float], seed: int) -> Path:
    """Reviews whose words carry their label (pos, neg, meh), labels drawn from `mix`; every text is unique (it
    ends with a per-file serial word) so that a test can look for each one."""
    rng = np.random.default_rng(seed)
    words = {"pos": GOOD, "neg": BAD, "meh": MID}
    names, p = list(mix), np.array(list(mix.values()))
    lines = ["text,label"]
    for i in range(n):
        label = names[rng.choice(len(names), p=p / p.sum())]
        text = " ".join([*rng.choice(FILL, 3), *rng.choice(words[label], 2), f"s{seed}x{i}"])
        lines.append(f"{text},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodedata")
    return dict(root=root, model=tiny_bert3(root),
                a=reviews_csv(root / "a.csv", 60, {"pos": 0.8, "neg": 0.2}, 1),
                b=reviews_csv(root / "b.csv", 60, {"pos": 0.2, "neg": 0.4, "meh": 0.4}, 2),
                test=reviews_csv(root / "server-test.csv", 30, {"pos": 1, "neg": 1, "meh": 1}, 3))


def tiny_config(files, **overrides) -> RunConfig:
    settings = dict(model=str(files["model"]), dataset="unused-by-nodes-with-their-own-data.csv", num_clients=2,
                    rounds=2, local_steps=2, batch_size=8, client_test_max=10, max_length=16, lora_r=2,
                    lora_alpha=4.0, threads=1, bf16=False, method="fedit")
    return RunConfig(**{**settings, **overrides})


# ---- pure pieces ------------------------------------------------------------------------------------
def test_labels_agreed_from_the_nodes_and_relabelled():
    assert agree_labels({1: ["pos", "neg"], 2: ["meh", "neg"]}) == ["meh", "neg", "pos"]
    assert agree_labels({1: ["b"]}, shared=["aa", "c"]) == ["b", "c", "aa"]
    with pytest.raises(FloranaError, match="labels = "):
        agree_labels({1: [], 2: []})
    ex = Examples(["x", "y", "z"], np.array([0, 1, 1]), ["neg", "pos"])
    assert relabel(ex, ["meh", "neg", "pos"], "node 7").labels.tolist() == [1, 2, 2]
    with pytest.raises(FloranaError, match=r"node 7: label 'pos' is not one of the run's labels \['neg'\]"):
        relabel(ex, ["neg"], "node 7")
    unused = Examples(["x"], np.array([0]), ["neg", "pos"])  # a name with no example is no problem
    assert relabel(unused, ["neg"], "node 7").labels.tolist() == [0]


@pytest.mark.parametrize("count, why", [(-1, "non-negative integer"), (2.5, "non-negative integer"),
                                        (float("nan"), "non-negative integer"), (None, "non-negative integer"),
                                        (True, "non-negative integer"), (101, "max_examples_per_node=100")])
def test_a_bad_count_is_an_error_naming_the_node(count, why):
    assert check_count(5, 100, 100) == 100 and check_count(5, 7.0, 0) == 7 and check_count(5, 10**9, 0) == 10**9
    with pytest.raises(FloranaError, match=f"node 5 reported .*{why}"):
        check_count(5, count, 100)


def test_model_hash_covers_config_and_weights_not_the_tokenizer(files, tmp_path):
    copy = shutil.copytree(files["model"], tmp_path / "copy")
    assert model_hash(copy) == model_hash(files["model"])
    (copy / "tokenizer_config.json").write_text("{}")
    assert model_hash(copy) == model_hash(files["model"])
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.3}))
    assert model_hash(copy) != model_hash(files["model"])
    with pytest.raises(FloranaError, match="not a model folder"):
        model_hash(tmp_path / "nowhere")


def test_versions_differ_by_package():
    mine = versions()
    assert set(mine) == {"florana", "torch", "transformers"} and version_problem(3, mine, dict(mine)) is None
    assert version_problem(3, mine, {**mine, "torch": "1.0"}) == f"node 3 runs torch 1.0 (server {mine['torch']})"


def test_node_config_is_checked():
    assert node_data_of({"partition-id": 0}, 1) is None
    got = node_data_of({"data-path": "a.csv", "text-column": "t", "test-fraction": 0.5}, 1)
    assert (got.path, got.text_column, got.label_column, got.test_fraction) == ("a.csv", "t", None, 0.5)
    with pytest.raises(FloranaError, match=r"node 1: test-fraction must be a number in \[0, 1\), got 1.5"):
        node_data_of({"data-path": "a.csv", "test-fraction": 1.5}, 1)


# ---- the real strategy and ClientApp, messages passed in this process -----------------------------------
class NodeGrid:
    """Flower's Grid in this process with each node's own node config; it keeps every reply a node sent (the
    messages that leave the node), and `edit` may change a reply on its way (a node with other versions)."""

    def __init__(self, node_configs: list[dict], edit=None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config=c, state=RecordDict(),
                                          run_config={}) for i, c in enumerate(node_configs)}
        self.sent: list[tuple[int, Message]] = []
        self.edit = edit

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from florana.flower.client import app as client_app

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as e:  # as a SuperNode reports a failed ClientApp
                reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            if self.edit and not reply.has_error():
                self.edit(node, reply)
            self.sent.append((node, reply))
            replies.append(reply)
        return replies


def own(path: Path, **more) -> dict:
    return {"data-path": str(path), **more}


def strings_and_bytes(content: RecordDict) -> tuple[list[str], bytes, set[str]]:
    """Every string and every array's bytes in a message's content, and its metric names."""
    strings, blobs, metric_keys = [], b"", set()
    for record in content.config_records.values():
        for key, value in record.items():
            strings.append(key)
            strings.extend(map(str, value) if isinstance(value, list) else [str(value)])
    for record in content.metric_records.values():
        metric_keys.update(record)
    for record in content.array_records.values():
        for key, array in record.items():
            strings.append(key)
            blobs += array.numpy().tobytes()
    return strings, blobs, metric_keys


def test_two_nodes_with_their_own_data_and_no_text_leaves_them(files, tmp_path):
    """Node A (mostly pos, no meh) and node B (meh, neg, some pos): the server learns the label names and agrees on
    their union, each node trains only its file, scores the global model on its held-out part, and no message a node
    sends holds any of its texts, a label histogram or anything but counts, losses and accuracies."""
    from florana.flower.server import serve

    grid = NodeGrid([own(files["a"], **{"model-path": str(shutil.copytree(files["model"], tmp_path / "pinned"))}),
                     own(files["b"], **{"test-fraction": 0.25})])
    serve(grid, tiny_config(files), tmp_path / "run", node_wait=5)
    stored = (tmp_path / "run" / "config.toml").read_text()
    assert 'labels = [\n    "meh",\n    "neg",\n    "pos",\n]' in stored
    history = read_metrics(tmp_path / "run")
    assert [m["round"] for m in history] == [1, 2]
    for m in history:
        assert m["global_accuracy"] is None and m["global_test"] == "none" and m["rejected"] == []
        assert sorted(m["node_global_accuracy"]) == ["0", "1"] and 0 <= m["node_global_accuracy_mean"] <= 1
        held_out = {"1": 10, "0": 10}  # a: 20% of 60 = 12 → client_test_max 10; b: 25% of 60 = 15 → 10
        mean = sum(m["node_global_accuracy"][u] * n for u, n in held_out.items()) / sum(held_out.values())
        assert m["node_global_accuracy_mean"] == pytest.approx(mean)
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert partition == [{"client": 0, "node_data": True}, {"client": 1, "node_data": True}]
    assert (tmp_path / "run" / "global_adapter" / "adapter_model.safetensors").is_file()
    # what left the nodes
    texts = {node: [line.rsplit(",", 1)[0] for line in files[k].read_text().splitlines()[1:]]
             for node, k in ((100, "a"), (101, "b"))}
    allowed = {"partition-id", "node-data", "num-examples", "loss", "local-accuracy", "global-accuracy",
               "global-loss", "num-test"}
    kinds = {}
    for node, reply in grid.sent:
        strings, blob, metric_keys = strings_and_bytes(reply.content)
        kinds.setdefault(node, []).append(reply.metadata.message_type)
        assert metric_keys <= allowed, metric_keys
        for text in texts[node]:
            serial = text.rsplit(" ", 1)[1]  # a word no other text has
            assert not any(serial in s for s in strings) and serial.encode() not in blob and text.encode() not in blob
        for s in strings:
            assert s in ("pos", "neg", "meh") or not any(s == w for w in GOOD + BAD + MID + FILL)
    assert all(k.count("query") == 1 and k.count("train") == 2 and k.count("evaluate") == 2 for k in kinds.values())


def test_sample_level_dp_with_nodes_own_data_accounts_each_client_as_its_node_plans_it(files, tmp_path):
    """The server never loads a node's own data: it plans the client's DP-SGD from the count the node reports, so
    its σ, q and δ are the node's own and every client's recorded ε is where the target put it (each took part in
    every round), under uniform weights too (where the count is not a weight)."""
    from florana.flower import client
    from florana.flower.server import serve

    grid = NodeGrid([own(files["a"]), own(files["b"], **{"test-fraction": 0.5})])  # 48 and 30 training examples
    serve(grid, tiny_config(files, dp="sample", dp_epsilon=4.0, weighting="uniform"), tmp_path / "run", node_wait=5)
    last = read_metrics(tmp_path / "run")[-1]
    assert sorted(last["dp_epsilon"]) == ["0", "1"] and all(3.8 <= e <= 4.0 for e in last["dp_epsilon"].values())
    assert last["dp_noise"]["0"] != last["dp_noise"]["1"]  # each client's own σ for its own sample rate
    node = next(iter(client._worker.values()))  # the last node process's Federation: it planned only itself
    (u, sigma), = node.privacy.noise.items()
    assert last["dp_noise"][str(u)] == sigma and last["dp_delta"][str(u)] == node.privacy.deltas[u]


def test_a_server_test_file_scores_the_global_model(files, tmp_path):
    from florana.flower.server import serve

    serve(NodeGrid([own(files["a"]), own(files["b"])]),
          tiny_config(files, rounds=1, labels=["neg", "pos", "meh"], server_test_data=str(files["test"])),
          tmp_path / "run", node_wait=5)
    (m,) = read_metrics(tmp_path / "run")
    assert "global_test" not in m and 0 <= m["global_accuracy"] <= 1 and len(m["node_global_accuracy"]) == 2


def test_a_label_the_run_does_not_know_names_the_node_and_the_label(files, tmp_path):
    from florana.flower.server import serve

    with pytest.raises(FloranaError, match=r"node 101: label 'meh' is not one of the run's labels \['neg', 'pos'\]"):
        serve(NodeGrid([own(files["a"]), own(files["b"])]), tiny_config(files, labels=["neg", "pos"]),
              tmp_path / "run", node_wait=5)
    assert not list((tmp_path / "run").glob("checkpoints/round-*"))


def test_a_pinned_model_that_is_not_the_base_names_the_node(files, tmp_path):
    from florana.flower.server import serve

    other = tiny_bert3(tmp_path, seed=1)
    with pytest.raises(FloranaError, match=r"node 101: its model-path does not match the run's base model"):
        serve(NodeGrid([own(files["a"]), own(files["b"], **{"model-path": str(other)})]), tiny_config(files),
              tmp_path / "run", node_wait=5)


def test_a_count_beyond_the_bound_names_the_node(files, tmp_path):
    from florana.flower.server import serve

    with pytest.raises(FloranaError, match=r"node 10[01] reported 48 training examples, more than "
                                           r"max_examples_per_node=40"):
        serve(NodeGrid([own(files["a"]), own(files["b"], **{"test-fraction": 0.5})]),
              tiny_config(files, max_examples_per_node=40), tmp_path / "run", node_wait=5)


def other_torch(node: int, reply: Message) -> None:
    if node == 101 and "node" in reply.content.config_records:
        reply.content.config_records["node"]["torch"] = "0.0.1"


def test_other_versions_are_a_warning_or_with_strict_versions_an_error(files, tmp_path, caplog):
    from florana.flower.server import serve

    caplog.set_level(logging.WARNING, logger="florana")
    serve(NodeGrid([own(files["a"]), own(files["b"])], edit=other_torch), tiny_config(files, rounds=1),
          tmp_path / "warn", node_wait=5)
    assert f"node 101 runs torch 0.0.1 (server {torch.__version__})" in caplog.text
    assert [m["round"] for m in read_metrics(tmp_path / "warn")] == [1]
    with pytest.raises(FloranaError, match=r"node 101 runs torch 0.0.1 .*\(strict_versions = true\)"):
        serve(NodeGrid([own(files["a"]), own(files["b"])], edit=other_torch),
              tiny_config(files, rounds=1, strict_versions=True), tmp_path / "strict", node_wait=5)


# ---- real processes on loopback ---------------------------------------------------------------------------
def test_loopback_mixed_federation_from_the_script(files, tmp_path):
    """scripts/loopback_federation.py --nodes 1 --node-data a.csv,b.csv: a SuperLink, one SuperNode on a partition
    of the run's dataset and two on their own files, `flwr run`; the label list is the union of the dataset's and
    the nodes' names, and the two own-data nodes score the global model."""
    import subprocess
    import sys

    from florana.flower.deploy import pids_with_env
    from tiny import sentiment_csv

    root = Path(__file__).resolve().parent.parent
    cfg = tiny_config(files, dataset=str(sentiment_csv(tmp_path)), test_size=40, rounds=1, num_clients=3)
    (tmp_path / "cfg.toml").write_text(cfg.to_toml())
    done = subprocess.run([sys.executable, str(root / "scripts" / "loopback_federation.py"), "--nodes", "1",
                           "--node-data", f"{files['a']},{files['b']}", "--config", str(tmp_path / "cfg.toml"),
                           "--out", str(tmp_path / "run"), "--home", str(tmp_path / "home"), "--round-timeout", "120"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "1 SuperNodes on partitions, 2 on their own data" in done.stdout
    (m,) = read_metrics(tmp_path / "run")
    assert m["clients"] == [0, 1, 2] and m["rejected"] == [] and m["global_test"] == "none"
    assert sorted(m["node_global_accuracy"]) == ["1", "2"]  # own data fills the highest free slots
    assert 'labels = [\n    "meh",\n    "neg",\n    "pos",\n]' in (tmp_path / "run" / "config.toml").read_text()
    assert not pids_with_env("FLWR_HOME", str((tmp_path / "home" / "flwr").resolve()))
