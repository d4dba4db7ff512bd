"""Run configs: TOML in and out, unknown keys and bad values refused with the file named."""

import pytest

from florana.config import RunConfig, config_from_dict, load_config
from florana.errors import FloranaError


def test_toml_round_trip(tmp_path):
    cfg = RunConfig(method="svd", alpha=0.1, target_modules=["query", "key"], rounds=3)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('method = "fedit"\nround = 3\n')
    with pytest.raises(FloranaError, match=rf"{path}: unknown key\(s\) round"):
        load_config(path)


@pytest.mark.parametrize("data, message", [
    ({"alpha": 0}, "alpha must be > 0"),
    ({"alpha": -1.0}, "alpha must be > 0"),
    ({"method": "fedprox"}, "unknown method 'fedprox'"),
    ({"rounds": "3"}, "rounds should be int"),
    ({"bf16": 1}, "bf16 should be bool"),
    ({"partition": "zipf"}, "partition must be one of iid, dirichlet, shards, quantity, got 'zipf'"),
    ({"task": "regression"}, "task must be one of classification, causal_lm"),
    # ints are ints: no floats, no bools
    ({"rounds": 2.5}, "rounds should be int, got 2.5"),
    ({"rounds": 2.0}, "rounds should be int, got 2.0"),
    ({"num_clients": True}, "num_clients should be int, got True"),
    ({"lr": True}, "lr should be float, got True"),
    ({"lr": "1e-3"}, "lr should be float"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"model": 3}, "model should be str"),
    ({"target_modules": "query"}, "target_modules should be a list of non-empty strings"),
    ({"target_modules": ["query", ""]}, "target_modules should be a list of non-empty strings"),
    ({"target_modules": ["query", 1]}, "target_modules should be a list of non-empty strings"),
    # a range for every numeric field
    ({"target_modules": []}, "target_modules must be non-empty"),
    ({"model": " "}, "model must be non-empty"),
    ({"threads": 0}, "threads must be >= 1, got 0"),
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"local_steps": 0}, "local_steps must be >= 1"),
    ({"rounds": 0}, "rounds must be >= 1"),
    ({"num_clients": 0}, "num_clients must be >= 1"),
    ({"shards_per_client": 0}, "shards_per_client must be >= 1"),
    ({"lora_r": 0}, "lora_r must be >= 1"),
    ({"max_length": 0}, "max_length must be >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"test_size": -5}, "test_size must be >= 1, got -5"),
    ({"test_size": 0}, "test_size must be >= 1"),
    ({"client_test_max": -1}, "client_test_max must be >= 0"),
    ({"max_examples": -1}, "max_examples must be >= 0"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"lr": 0}, "lr must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"lora_alpha": 0}, "lora_alpha must be > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
    ({"client_test_fraction": 1}, r"client_test_fraction must be in \[0, 1\)"),
    ({"sample_fraction": 0}, r"sample_fraction must be in \(0, 1\]"),
    ({"sample_fraction": 1.5}, r"sample_fraction must be in \(0, 1\]"),
    ({"weighting": "size"}, "weighting must be one of uniform, examples"),
    ({"fedsvd_period": 0}, "fedsvd_period must be >= 1"),
    ({"lora_fair_lambda": -0.1}, "lora_fair_lambda must be >= 0"),
    ({"lora_fair_steps": -1}, "lora_fair_steps must be >= 0"),
    ({"lora_fair_lr": 0}, "lora_fair_lr must be > 0"),
    ({"lora_fair_refit": "newton"}, "lora_fair_refit must be one of cosine, least_squares"),
    # error feedback only where aggregation loses something the server can see
    ({"method": "ffa", "error_feedback": True}, "error_feedback=true does not apply to ffa: it is exact"),
    ({"method": "rolora", "error_feedback": True}, "error_feedback=true does not apply to rolora: it is exact"),
    ({"method": "fedsvd", "error_feedback": True}, "error_feedback=true does not apply to fedsvd: it is exact"),
    ({"method": "fedex", "error_feedback": True}, "error_feedback=true does not apply to fedex: it is exact"),
    ({"method": "fedsa", "error_feedback": True}, "error_feedback=true does not apply to fedsa: its server never sees B.*"
                                                   r"\(it applies to fedit, florana, svd, hetlora, flexlora, lora_fair\)"),
    ({"method": "centralized", "error_feedback": True}, "error_feedback=true needs an aggregator; centralized is a bound"),
    ({"error_feedback": 1}, "error_feedback should be bool"),
    ({"client_ranks": [4, 0]}, r"client_ranks must be positive integers, got \[4, 0\]"),
    ({"client_ranks": [4, -8]}, "client_ranks must be positive integers"),
    ({"client_ranks": [4, 8.0]}, r"client_ranks should be a list of integers, got \[4, 8.0\]"),
    ({"client_ranks": [4, True]}, "client_ranks should be a list of integers"),
    ({"client_ranks": "4,8"}, "client_ranks should be a list of integers, got '4,8'"),
    ({"client_ranks": [4, 8, 16], "num_clients": 2},
     "client_ranks has 3 entries for num_clients=2: give one per client, or a shorter list that is cycled"),
    # the new methods need equal ranks, named with the methods that accept mixed ones
    ({"method": "rolora", "client_ranks": [2, 4]}, "client_ranks gives the clients different ranks \\[2, 4\\], which "
                                                   "method 'rolora' does not accept; methods that do: fedit, ffa"),
    ({"method": "lora_fair", "client_ranks": [2, 4]}, r"client_ranks .* \[2, 4\], which method 'lora_fair' does not"),
    ({"method": "fedsvd", "client_ranks": [4, 2]}, r"client_ranks .* \[2, 4\], which method 'fedsvd' does not"),
])
def test_bad_values(data, message):
    """Every path into a RunConfig (a file, flags, code) gets the same check; a file's errors name the file."""
    with pytest.raises(FloranaError, match="cfg.toml: " + message):
        config_from_dict(data, "cfg.toml")
    with pytest.raises(FloranaError, match=message):
        RunConfig().with_overrides(**data)
    with pytest.raises(FloranaError, match=message):
        RunConfig(**data)


def test_numbers_are_stored_in_their_field_type():
    cfg = config_from_dict({"lr": 1, "alpha": 2, "lora_alpha": 16, "rounds": 3}, "cfg.toml")
    assert (cfg.lr, cfg.alpha, cfg.lora_alpha, cfg.rounds) == (1.0, 2.0, 16.0, 3)
    assert all(type(v) is float for v in (cfg.lr, cfg.alpha, cfg.lora_alpha)) and type(cfg.rounds) is int
    assert cfg == RunConfig(lr=1.0, alpha=2.0, lora_alpha=16.0, rounds=3)
    assert RunConfig(weight_decay=0, client_test_max=0, max_examples=0).weight_decay == 0.0


def test_every_field_has_help():
    from florana.config import FIELDS

    assert all(f.metadata["help"] for f in FIELDS.values())


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FloranaError, match="no such config file"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    with pytest.raises(FloranaError, match="invalid TOML"):
        load_config(bad)


def test_shipped_configs_parse_and_default_matches():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    assert load_config(root / "default.toml") == RunConfig()
    smoke = load_config(root / "gsm_smollm2_smoke.toml")
    assert smoke.task == "causal_lm" and smoke.model == "smollm2"
    code_smoke = load_config(root / "humaneval_smollm2_smoke.toml")
    assert code_smoke.task == "code" and code_smoke.model == "smollm2" and code_smoke.dataset == "humaneval"
    mbpp = load_config(root / "mbpp_qwen2.5_0.5b.toml")
    assert mbpp.task == "code" and mbpp.dataset == "mbpp" and 0 < mbpp.eval_max_examples < mbpp.test_size


def test_client_ranks_one_per_client_or_cycled(tmp_path):
    assert RunConfig(num_clients=3).ranks() == [8, 8, 8]
    assert RunConfig(num_clients=5, client_ranks=[4, 8, 16]).ranks() == [4, 8, 16, 4, 8]
    assert RunConfig(num_clients=2, client_ranks=[16, 4]).ranks() == [16, 4]
    cfg = RunConfig(num_clients=3, client_ranks=[4, 8], method="hetlora")
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg and "client_ranks = [\n    4,\n    8,\n]" in path.read_text()


def test_a_method_that_refuses_mixed_ranks_is_named_with_the_key(monkeypatch):
    """A method that does not accept mixed ranks (rolora, lora_fair, fedsvd, or one added later) is refused
    before anything loads, naming client_ranks, unless the ranks do not actually differ."""
    import dataclasses

    from florana.aggregation import METHODS

    monkeypatch.setitem(METHODS, "strict", dataclasses.replace(METHODS["fedit"], name="strict", mixed_ranks=False))
    with pytest.raises(FloranaError, match=r"cfg.toml: client_ranks gives the clients different ranks \[4, 8\], "
                                           r"which method 'strict' does not accept; methods that do: fedit, "):
        config_from_dict({"method": "strict", "client_ranks": [4, 8]}, "cfg.toml")
    assert RunConfig(method="strict", client_ranks=[4, 4]).ranks() == [4] * 10
    for name in ("centralized", "local", *[m for m in METHODS if METHODS[m].mixed_ranks]):
        RunConfig(method=name, client_ranks=[4, 8])
