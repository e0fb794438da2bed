"""The deployment recipes (Dockerfile, compose.yaml, .env.example, docs/examples/train.sbatch): Docker and Slurm
can't run here, so each file is parsed and every command it runs is checked against the kit: the `cua-kit`
subcommand exists, its config and overrides load, the files it copies and the extras it installs exist, and
every variable it asks for is one the kit or its docs name."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from cua_kit import allocation, cli, launch
from cua_kit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _check_kit_command(argv: list[str]) -> None:
    """`cua-kit SUBCOMMAND ...` as the kit's CLI reads it: the subcommand exists, and a train command's config and
    overrides load (a typo fails with the config system's message)."""
    assert argv[0] == "cua-kit" and "cua-kit" in PYPROJECT["project"]["scripts"], argv
    cli._register_feature_commands()
    if argv[1:] == ["--help"]:  # the kit's own usage: argparse prints it and exits 0
        with pytest.raises(SystemExit) as done:
            cli.build_parser().parse_args(["--help"])
        assert done.value.code == 0
        return
    args, extra = cli.build_parser().parse_known_args(argv[1:])
    assert args.command in cli.COMMANDS
    if args.command in ("train", "sft", "eval", "serve"):
        config, overrides = cli._config_and_overrides(args, extra)
        assert config is None or (ROOT / config).is_file(), config
        load_config(ROOT / config if config else None, overrides)
    else:
        assert not extra, f"{argv}: arguments the command does not take: {extra}"


def test_dockerfile_builds_the_kit_with_its_vllm_and_unsloth_extras():
    steps = _instructions(ROOT / "Dockerfile")
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvidia/cuda:")  # a CUDA base
    for kind, args in steps:
        if kind == "COPY":
            *sources, _ = args.split()
            assert all((ROOT / s).exists() for s in sources), args
    installs = [m.group(1) for kind, args in steps if kind == "RUN" for m in re.finditer(r'-e "\.\[([\w,]+)\]"', args)]
    extras = {e for group in installs for e in group.split(",")}
    assert {"vllm", "unsloth"} <= extras <= set(PYPROJECT["project"]["optional-dependencies"])
    cmd = next(args for kind, args in steps if kind == "CMD")
    _check_kit_command(yaml.safe_load(cmd))


def test_compose_runs_a_vllm_server_the_trainer_and_the_dashboard_from_the_kit_s_image():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert {"vllm", "trainer", "dashboard"} <= set(services)
    built = {s["image"] for s in services.values() if "build" in s}
    assert (ROOT / services["vllm"]["build"] / "Dockerfile").is_file()
    for name, service in services.items():
        assert service["image"] in built, f"{name}: an image no service builds"
        assert service.get("env_file") in (None, ".env") and (ROOT / ".env.example").is_file()
        _check_kit_command(service["command"])
    # the trainer reaches the server the way `cua-kit serve` listens: 127.0.0.1, in the server's network
    serve, train = services["vllm"]["command"], services["trainer"]["command"]
    server = load_config(ROOT / serve[2], serve[3:])
    cfg = load_config(ROOT / train[2], train[3:])
    assert services["trainer"]["network_mode"] == "service:vllm" and serve[2] == train[2]
    assert cfg.rollout.backend == "vllm" and cfg.vllm.api_base == f"http://127.0.0.1:{server.vllm.port}"
    # GPUs 0-3 serve (tensor parallel 4), 4-7 train (fsdp:d4), as configs/multi_gpu.yaml's own layout places them
    gpus = {n: services[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for n in ("vllm", "trainer")}
    own = allocation.place(allocation.parse(server.launch.allocation), [str(g) for g in range(8)])
    assert (gpus["trainer"], gpus["vllm"]) == own and server.vllm.tensor_parallel_size == len(gpus["vllm"])
    assert allocation.parse(cfg.launch.allocation).trainers == len(gpus["trainer"])


def test_every_variable_of_env_example_is_one_the_kit_names():
    names = [line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
             if line and not line.startswith("#")]
    assert {"GBOX_API_KEY", "WANDB_API_KEY"} <= set(names)
    corpus = "\n".join(p.read_text() for folder in ("cua_kit", "app", "docs") for p in (ROOT / folder).rglob("*")
                       if p.suffix in (".py", ".md"))
    for name in names:
        assert name in corpus, f".env.example asks for {name}, which neither the kit nor its docs mention"


def test_the_slurm_example_runs_one_kit_command_per_node_that_fits_its_nodes():
    text = (ROOT / "docs/examples/train.sbatch").read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = ",".join(str(g) for g in range(int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))))
    task = re.search(r"srun .*? bash -c '([^']*)'", text.replace("\\\n", " "), re.S).group(1)
    for node in range(nodes):  # what srun runs on each node, with the variables Slurm and the script set there
        values = {"SLURM_NNODES": str(nodes), "SLURM_NODEID": str(node), "OUTPUT_DIR": "/shared/outputs",
                  "HEAD_NODE": "node0", "RDZV_PORT": "29500"}
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: values[m.group(1)], task))
        assert argv[:2] == ["exec", ".venv/bin/cua-kit"]
        argv = ["cua-kit", *argv[2:]]
        _check_kit_command(argv)
        cfg = load_config(ROOT / argv[2], argv[3:])
        assert (cfg.launch.nnodes, cfg.launch.node_rank, cfg.launch.rdzv_endpoint) == (nodes, node, "node0:29500")
        run, _ = launch.run_command(argv[2], argv[3:], cfg, {"CUDA_VISIBLE_DEVICES": gpus})  # fits a node
        assert run[run.index("--nnodes") + 1] == str(nodes) and run[run.index("--node-rank") + 1] == str(node)


@pytest.mark.parametrize("path", ["Dockerfile", "compose.yaml", ".env.example", "docs/examples/train.sbatch"])
def test_the_recipes_are_documented(path):
    assert path in (ROOT / "docs/training.md").read_text()
