"""Typed configs: YAML + env vars + dotted overrides, errors that name the field, legacy flags."""

from pathlib import Path

import pytest

from cua_kit.cli import main as cli_main
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
    ("rollout.temperature=0", r"rollout.temperature=0.0 is not allowed; allowed: a finite number > 0"),
    ("lora.groups=[language,vision]", "unknown group 'vision'"),
    ("trainer.learning_rate=fast", "trainer.learning_rate: expected a number"),
    # layouts (cua_kit/allocation.py): the part it can't use, and what to write
    ("launch.allocation=fsdp:4", "launch.allocation='fsdp:4' is not allowed; allowed: 'fsdp:4' can't be read; write"),
    ("launch.allocation=fsdp:d2t2", "tensor parallelism"),
    ("launch.allocation=vllm:d2t2+fsdp:d4", "drives one server .* vllm:d1t4"),
    ("launch.allocation=fsdp:d2p2", "pipeline parallelism"),
    ("launch.node_rank=2", r"launch.node_rank=2 is not allowed; allowed: an integer in \[0, launch.nnodes\)"),
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


# ---- nonsense is refused at load time, in one line naming the key and what is allowed (issue 18) --------
@pytest.mark.parametrize("override, allowed", [
    ("rollout.n_samples=1", "an integer >= 2"),  # a group of one has no advantage: it was replayed forever
    ("trainer.learning_rate=.inf", "a finite number"),  # "finished" with inf weights
    ("trainer.learning_rate=-1e-5", "a finite number > 0"),
    ("trainer.max_steps=-3", "an integer >= 1"),  # "finished" at step 0
    ("env.step_timeout_s=0", "seconds > 0"),
    ("env.reset_timeout_s=-1", "seconds > 0"),
    ("saver.keep_last=0", "an integer >= 1"),
    ("sft.learning_rate=-1", "a finite number > 0"),
    ("rollout.temperature=.inf", "a finite number"),
    ("rollout.temperature=.nan", "a finite number"),
    ("rollout.max_new_tokens=0", "an integer >= 1"),
    ("env.name=miniwobb", "did you mean 'miniwob'"),  # was a traceback when the pool started
    ("trial_name=../../escape", "a folder name, not a path"),
    ("experiment_name=/tmp/elsewhere", "a folder name, not a path"),
    ("sft.output=../outside", "a folder inside the run folder"),
    ("trainer.seed=99999999999", "at most 2147483647"),
    ("trainer.eval_every=-1", "an integer >= 0"),
    ("grpo.minibatches=0", "an integer >= 1"),
    ("model.device=gpu", "auto, cpu, mps, cuda or cuda:N"),
])
def test_nonsense_is_refused_with_the_key_and_the_allowed_values(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], environ={})
    message = str(err.value)
    assert message.startswith(key) and allowed in message and "\n" not in message


def test_every_shipped_default_passes_its_own_rules():
    from cua_kit.config import validate

    validate(Config())


def _yaml_bomb(levels: int = 9) -> str:
    """Aliases of aliases: ~370 bytes that expand to 9^9 nodes when walked (the config is copied and dumped)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nenv:\n  options:\n    x: *a{levels - 1}\n"


@pytest.mark.parametrize("content, message", [
    (None, "is not a file"),  # a folder
    ("trial_name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),  # was a RecursionError
    (_yaml_bomb(), "more than 200,000 nodes"),  # was 28 s and 1.2 GB
    ("env:\n  options: &a {x: *a}\n", "a cycle"),
    ("trainer: [1, 2\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "cfg.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, environ={})
    assert "\n" not in str(err.value)


def test_bad_task_files_are_one_line(tmp_path):
    from cua_kit.envs.base import load_tasks

    bad = {"folder.jsonl": None, "latin1.jsonl": '{"id": "caf\xe9", "env": "synth"}\n'.encode("latin-1"),
           "notjson.jsonl": b"{oops\n", "noid.jsonl": b'{"env": "synth"}\n', "list.yaml": b"tasks: 3\n",
           "bomb.yaml": _yaml_bomb().encode()}
    for name, content in bad.items():
        path = tmp_path / name
        path.mkdir() if content is None else path.write_bytes(content)
        with pytest.raises(ConfigError) as err:
            load_tasks(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name


def test_cli_errors_are_one_line_without_a_traceback(tmp_path, capsys):
    quickstart = str(Path(__file__).parents[1] / "configs/quickstart.yaml")
    assert cli_main(["config", "show", quickstart, "--config"]) == 2  # was an IndexError
    assert "--config needs a YAML file" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("")
    # an output folder that can't be written is refused before any model is loaded
    assert cli_main(["train", quickstart, f"output_dir={afile}", "model.adapter_path="]) == 2
    err = capsys.readouterr().err
    assert "can't write the run folder" in err and "output_dir=" in err and "Traceback" not in err
