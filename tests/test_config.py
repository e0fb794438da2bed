"""Typed configs: YAML + env vars + dotted overrides, errors that name the field, legacy flags."""

import pytest

from cua_kit.config import Config, ConfigError, describe_fields, load_config, parse_overrides, save_config


def test_defaults_match_the_original_system():
    cfg = Config()
    assert (cfg.rollout.n_samples, cfg.rollout.temperature, cfg.grpo.kl_ctl, cfg.grpo.eps_clip) == (4, 0.7, 0.01, 0.2)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.trainer.learning_rate, cfg.trainer.batch_size) == (16, 32, 1e-5, 2)
    assert (cfg.rollout.max_turns, cfg.rollout.max_new_tokens, cfg.trainer.max_steps) == (15, 1024, 200)


def test_every_field_has_a_doc():
    rows = describe_fields()
    assert len(rows) > 50
    missing = [key for key, _, doc in rows if not doc]
    assert missing == []


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config(None, ["trainer.max_stepz=3"], environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  n_sample: 4\n")
    with pytest.raises(ConfigError, match="rollout.n_samples"):
        load_config(bad, environ={})


@pytest.mark.parametrize("override,match", [
    ("lora.r=abc", "lora.r: expected an integer"),
    ("model.loader=fast", r"model.loader: 'fast' is not allowed; choose one of \['hf', 'unsloth'\]"),
    ("logging.verbose=maybe", "logging.verbose: expected true/false"),
    ("rollout.temperature=0", "temperature must be > 0"),
    ("lora.groups=[language,vision]", "unknown group 'vision'"),
    ("trainer.learning_rate=fast", "trainer.learning_rate: expected a number"),
    # layouts (cua_kit/allocation.py): the part it can't use, and what to write
    ("launch.allocation=fsdp:4", "launch.allocation: can't read 'fsdp:4'; write"),
    ("launch.allocation=fsdp:d2t2", "tensor parallelism"),
    ("launch.allocation=vllm:d2t2+fsdp:d4", "drives one server .* vllm:d1t4"),
    ("launch.allocation=fsdp:d2p2", "pipeline parallelism"),
    ("launch.node_rank=2", r"launch.node_rank must be in \[0, launch.nnodes\)"),
])
def test_bad_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override], environ={})


def test_precedence_defaults_yaml_env_cli(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("model:\n  name: from-yaml\ntrainer:\n  max_steps: 7\n  batch_size: 3\noutput_dir: y\n")
    cfg = load_config(yml, [], environ={})
    assert (cfg.model.name, cfg.trainer.max_steps, cfg.trainer.batch_size) == ("from-yaml", 7, 3)
    cfg = load_config(yml, [], environ={"MODEL_NAME": "from-env", "OUTPUT_DIR": "envout"})
    assert (cfg.model.name, cfg.output_dir, cfg.trainer.max_steps) == ("from-env", "envout", 7)
    cfg = load_config(yml, ["--model-name", "from-cli", "trainer.max_steps=9"], environ={"MODEL_NAME": "from-env"})
    assert (cfg.model.name, cfg.trainer.max_steps, cfg.trainer.batch_size) == ("from-cli", 9, 3)


def test_env_var_booleans():
    cfg = load_config(None, [], environ={"USE_LORA": "false", "LOAD_IN_4BIT": "1"})
    assert cfg.lora.enabled is False and cfg.model.load_in_4bit is True


def test_legacy_flags_map_to_fields():
    flags = ["--model-name", "m", "--lora-r", "8", "--lora-alpha", "16", "--batch-size", "1", "--num-rollouts", "6",
             "--max-steps", "3", "--learning-rate", "2e-5", "--output-dir", "o", "--resume", "--verbose", "--wandb",
             "--recover.ckpt_path=/x/checkpoint-2"]
    cfg = load_config(None, flags, environ={})
    assert (cfg.model.name, cfg.lora.r, cfg.lora.alpha, cfg.trainer.batch_size) == ("m", 8, 16, 1)
    assert (cfg.rollout.n_samples, cfg.trainer.max_steps, cfg.trainer.learning_rate) == (6, 3, 2e-5)
    assert (cfg.output_dir, cfg.recover.mode, cfg.recover.ckpt_path) == ("o", "resume", "/x/checkpoint-2")
    assert cfg.logging.verbose and cfg.logging.wandb


def test_override_forms():
    assert parse_overrides(["a.b=1", "--c.d=true", "--e.f", "x", "--recover.mode=resume"]) == {
        "a.b": 1, "c.d": True, "e.f": "x", "recover.mode": "resume"}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["oops"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["trainer.max_steps=4", "env.options={screen_size: [200, 300]}"], environ={})
    path = save_config(cfg, tmp_path)
    again = load_config(path, environ={})
    assert again == cfg and again.env.options == {"screen_size": [200, 300]}


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path, environ={})


def test_vllm_section_env_var_and_bad_values():
    cfg = load_config(None, ["rollout.backend=vllm"], environ={"VLLM_API_BASE": "http://10.0.0.2:8000"})
    assert (cfg.vllm.api_base, cfg.vllm.gpu_memory_utilization, cfg.vllm.port) == ("http://10.0.0.2:8000", 0.35, 0)
    for overrides, match in [
        (["vllm.gpu_memory_utilization=1.5"], r"vllm.gpu_memory_utilization must be in \(0, 1\]"),
        (["vllm.api_base=localhost:8000"], "vllm.api_base must start with http://"),
        (["vllm.max_lora_rank=12"], r"vllm.max_lora_rank must be 0 \(from lora.r\) or one of \[1, 8, 16"),
        (["vllm.gpus=a,b"], "vllm.gpus must be GPU indices"),
        (["rollout.backend=vllm", "lora.enabled=false"], "rollout.backend=vllm needs lora.enabled=true"),
        (["rollout.backend=vllm", "lora.r=32", "vllm.max_lora_rank=16"], "lora.r=32 is above vLLM's LoRA rank limit 16"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides, environ={})
