"""Tests for the launch scripts (launch/*.sh): help, dry runs, errors, and real runs against stub
gcloud / srun / sbatch / cclm-jax executables that record how they were called."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu_vm.sh", "gpu.sh", "slurm.sh", "install.sh")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]


# ---- helpers -------------------------------------------------------------------------------------
def clean_env(path_prefix=None, **extra):
    """The test process's environment without XLA_FLAGS (conftest sets fake CPU devices there)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def run_script(script, *args, env=None, cwd=None):
    """Runs a launch script with bash; `script` is a name in launch/ or a path."""
    path = script if os.sep in script else os.path.join(LAUNCH, script)
    return subprocess.run(["bash", path, *args], capture_output=True, text=True, timeout=60,
                          env=env if env is not None else clean_env(), cwd=cwd)


def commands(stdout):
    """The dry-run command lines ('+ ' prefix) as argv lists, parsed the way a POSIX shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def write_stub(bin_dir, name, body):
    """An executable bash script `name` in bin_dir."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body)
    os.chmod(path, 0o755)
    return path


def read_nul_args(path):
    with open(path, "rb") as f:
        return f.read().decode().split("\0")[:-1]


ARG_DUMP = 'printf "%s\\0" "$@" > "$ARGS_FILE"\n'


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "tiny_cfg.py"
    path.write_text("def get_config(arg=None):\n    return None\n")
    return str(path)


@pytest.fixture()
def checkout(tmp_path):
    """A small committed git checkout holding the launch scripts, setup.py and configs/tiny.py."""
    root = tmp_path / "checkout"
    (root / "launch").mkdir(parents=True)
    (root / "configs").mkdir()
    for name in os.listdir(LAUNCH):
        shutil.copy(os.path.join(LAUNCH, name), root / "launch" / name)
    shutil.copy(os.path.join(REPO, "setup.py"), root / "setup.py")
    (root / "configs" / "tiny.py").write_text("def get_config(arg=None):\n    return None\n")
    subprocess.run(GIT + ["init", "-q", str(root)], check=True)
    subprocess.run(GIT + ["-C", str(root), "add", "."], check=True)
    subprocess.run(GIT + ["-C", str(root), "commit", "-q", "-m", "init"], check=True)
    return root


# ---- every script: help, unknown options, quoting ---------------------------------------------
EXPECTED_OPTIONS = {
    "tpu_vm.sh": "--name --zone --project --accelerator --version --config --workdir --spot "
                 "--preemptible --delete --repo --ref --env --dry-run --help",
    "gpu.sh": "--config --workdir --venv --install --gpus --mem-fraction --no-xla-flags "
              "--coordinator --num-processes --process-id --dry-run --help",
    "slurm.sh": "--nodes --gpus-per-node --cpus-per-task --partition --time --account --config "
                "--workdir --job-name --out --venv --mem-fraction --no-xla-flags --submit --dry-run --help",
    "install.sh": "--venv --extra --python --dry-run --help",
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_parsed_option(script):
    with open(os.path.join(LAUNCH, script)) as f:
        parsed = set(re.findall(r"^\s+(?:-h \| )?(--[a-z][a-z-]*)\)", f.read(), re.M))
    assert parsed == set(EXPECTED_OPTIONS[script].split())
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    for option in parsed:
        assert re.search(rf"(^|\s){option}\b", result.stdout), f"{script} --help lacks {option}"
    assert "Example" in result.stdout
    assert os.access(os.path.join(LAUNCH, script), os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_is_rejected(script):
    result = run_script(script, "--bogus-option")
    assert result.returncode == 2
    assert "unknown option '--bogus-option'" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_option_without_value_is_rejected(script):
    option = {"tpu_vm.sh": "--zone", "gpu.sh": "--venv", "slurm.sh": "--nodes",
              "install.sh": "--venv"}[script]
    result = run_script(script, option)
    assert result.returncode == 2
    assert f"option {option} needs a value" in result.stderr


def test_quote_cmd_round_trips_through_bash():
    words = ["plain", "a b", "it's", "", "$HOME", "*", "a\nb", "--x=y z", "'", '"q"', "~/x", "é"]
    script = ('source "$1"; shift; line=$(quote_cmd "$@"); eval "set -- $line"; '
              'printf "%s\\0" "$@"')
    result = subprocess.run(["bash", "-c", script, "bash", os.path.join(LAUNCH, "lib.sh"), *words],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split("\0")[:-1] == words


# ---- missing required options ------------------------------------------------------------------
def _tpu_args(config):
    return ["--name", "n", "--zone", "z", "--accelerator", "v4-8", "--config", config,
            "--workdir", "gs://b/r", "--repo", "https://example.com/r.git"]


REQUIRED = [("tpu_vm.sh", opt) for opt in ("--name", "--zone", "--accelerator", "--config", "--workdir")]
REQUIRED += [("gpu.sh", opt) for opt in ("--config", "--workdir")]
REQUIRED += [("slurm.sh", opt) for opt in ("--nodes", "--config", "--workdir")]
REQUIRED += [("install.sh", "--venv")]


@pytest.mark.parametrize("script,missing", REQUIRED)
def test_missing_required_option_is_named(script, missing, config_file, tmp_path):
    full = {
        "tpu_vm.sh": _tpu_args(config_file),
        "gpu.sh": ["--config", config_file, "--workdir", "w"],
        "slurm.sh": ["--nodes", "2", "--config", config_file, "--workdir", "/w"],
        "install.sh": ["--venv", str(tmp_path / "v")],
    }[script]
    i = full.index(missing)
    result = run_script(script, *(full[:i] + full[i + 2:]), "--dry-run")
    assert result.returncode == 2
    assert f"missing required option {missing}" in result.stderr
    assert result.stdout == ""


# ---- tpu_vm.sh ---------------------------------------------------------------------------------
def test_tpu_dry_run_with_repo_threads_every_option():
    result = run_script(
        "tpu_vm.sh", "--name", "cclm-pod", "--zone=us-west4-a", "--project", "proj",
        "--accelerator", "v5litepod-64", "--spot", "--config", "configs/cclm_base.py:runlocal",
        "--workdir", "gs://bucket/run1", "--repo", "https://github.com/me/cclm_jax.git",
        "--ref", "v1.0", "--env", "LIBTPU_INIT_ARGS=--a=1 --b", "--delete", "--dry-run",
        "--", "--config.total_steps=7")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone", "us-west4-a", "--project", "proj"]
    assert cmds[0] == tpu + ["describe", "cclm-pod"] + where + ["--format=value(state)"]
    assert cmds[1] == tpu + ["create", "cclm-pod"] + where + [
        "--accelerator-type", "v5litepod-64", "--version", "v2-alpha-tpuv5-lite", "--spot"]
    ssh = tpu + ["ssh", "cclm-pod"] + where + ["--worker=all", "--command"]
    remote = []
    for cmd in cmds[2:5]:
        assert cmd[:-1] == ssh
        remote.append(cmd[-1])
    assert "git clone --quiet https://github.com/me/cclm_jax.git" in remote[0]
    assert "checkout --quiet v1.0" in remote[0]
    assert 'launch/install.sh --venv "$HOME/cclm_venv" --extra tpu' in remote[1]
    train = shlex.split(remote[2])
    start = train.index("$HOME/cclm_venv/bin/cclm-jax")
    assert train[start + 1:train.index("2>&1")] == [
        "train", "--config", "configs/cclm_base.py:runlocal", "--workdir", "gs://bucket/run1",
        "--config.distributed=True", "--config.total_steps=7"]
    assert "LIBTPU_INIT_ARGS=--a=1 --b;" in train
    assert cmds[5] == tpu + ["delete", "cclm-pod"] + where + ["--quiet"]
    assert len(cmds) == 6


def test_tpu_remote_train_command_runs_in_bash_with_exact_arguments(tmp_path):
    """Runs the remote training command as a worker's shell would, with a stub cclm-jax."""
    tricky = ["--config.note=it's \"quoted\" $HOME", "--config.x=a b"]
    result = run_script("tpu_vm.sh", *_tpu_args("configs/tiny.py"), "--env", "MY_VAR=x y'z",
                        "--dry-run", "--", *tricky)
    assert result.returncode == 0, result.stderr
    remote = commands(result.stdout)[-1][-1]
    home = tmp_path / "home"
    (home / "cclm_jax").mkdir(parents=True)
    write_stub(str(home / "cclm_venv" / "bin"), "cclm-jax",
               ARG_DUMP + 'printf "%s" "$MY_VAR" > "$HOME/env"; echo training; exit 3\n')
    args_file = str(tmp_path / "args")
    worker = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, timeout=30,
                            env=clean_env(HOME=str(home), ARGS_FILE=args_file))
    assert worker.returncode == 3  # pipefail: the trainer's failure is not hidden by tee
    assert read_nul_args(args_file) == [
        "train", "--config", "configs/tiny.py", "--workdir", "gs://b/r", "--config.distributed=True",
        *tricky]
    assert (home / "env").read_text() == "x y'z"
    assert (home / "cclm_train.log").read_text() == "training\n"
    assert worker.stdout == "training\n"


@pytest.mark.parametrize("accelerator,runtime", [
    ("v6e-256", "v2-alpha-tpuv6e"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v4-32", "tpu-ubuntu2204-base")])
def test_tpu_default_runtime_follows_accelerator(accelerator, runtime):
    args = _tpu_args("c.py")
    args[args.index("v4-8")] = accelerator
    result = run_script("tpu_vm.sh", *args, "--dry-run")
    create = commands(result.stdout)[1]
    assert create[create.index("--version") + 1] == runtime
    assert "--spot" not in create and "--preemptible" not in create


@pytest.mark.parametrize("extra,message", [
    (["--accelerator", "tpu7x-8"], "no default TPU software version for accelerator 'tpu7x-8'; pass --version"),
    (["--workdir", "/local/run"], "option --workdir must be a gs:// path"),
    (["--spot", "--preemptible"], "options --spot and --preemptible exclude each other"),
    (["--env", "1BAD=x"], "option --env expects KEY=VALUE"),
])
def test_tpu_rejects_bad_options(extra, message):
    result = run_script("tpu_vm.sh", *_tpu_args("c.py"), *extra, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr


def test_tpu_dry_run_local_copy_archives_the_ref(checkout):
    script = str(checkout / "launch" / "tpu_vm.sh")
    args = ["--name", "t1", "--zone", "z", "--accelerator", "v4-8", "--config", "configs/tiny.py",
            "--workdir", "gs://b/r", "--dry-run"]
    result = run_script(script, *args, env=clean_env(TMPDIR="/scratch"))
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert cmds[2] == ["git", "-C", str(checkout), "archive", "--format=tar.gz", "--prefix=cclm_jax/",
                       "-o", "/scratch/cclm_jax-t1.tar.gz", "HEAD"]
    assert cmds[3] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
                       "/scratch/cclm_jax-t1.tar.gz", "t1:cclm_jax.tar.gz", "--zone", "z", "--worker=all"]
    assert 'tar -xzf "$HOME/cclm_jax.tar.gz"' in cmds[5][-1]
    assert "warning: uncommitted changes" not in result.stderr

    (checkout / "setup.py").write_text("# edited\n")
    assert "warning: uncommitted changes" in run_script(script, *args).stderr

    missing = run_script(script, *args[:7], "configs/nope.py", *args[8:])
    assert missing.returncode == 2
    assert "option --config: configs/nope.py is not committed in HEAD" in missing.stderr

    bad_ref = run_script(script, *args, "--ref", "no-such-branch")
    assert bad_ref.returncode == 2
    assert "option --ref: 'no-such-branch' is not a commit" in bad_ref.stderr


GCLOUD_STUB = r"""
printf '%s\n' "$*" >> "$GCLOUD_LOG"
case "$4" in
  describe) [[ -n $STUB_STATE ]] || { echo "NOT_FOUND" >&2; exit 1; }; echo "$STUB_STATE" ;;
  scp) cp "$6" "$TARBALL_COPY" ;;
  ssh) [[ "$*" == *"cclm-jax\" train"* ]] && exit "$STUB_TRAIN_RC" ;;
  delete) exit "$STUB_DELETE_RC" ;;
esac
exit 0
"""


def _run_tpu_with_stub(checkout, tmp_path, state, train_rc, *extra, delete_rc=0):
    bin_dir = str(tmp_path / "bin")
    write_stub(bin_dir, "gcloud", GCLOUD_STUB)
    log = tmp_path / "gcloud.log"
    env = clean_env(bin_dir, GCLOUD_LOG=str(log), STUB_STATE=state, STUB_TRAIN_RC=str(train_rc),
                    STUB_DELETE_RC=str(delete_rc),
                    TARBALL_COPY=str(tmp_path / "shipped.tar.gz"), TMPDIR=str(tmp_path))
    result = run_script(str(checkout / "launch" / "tpu_vm.sh"), "--name", "t1", "--zone", "z",
                        "--accelerator", "v4-8", "--config", "configs/tiny.py", "--workdir",
                        "gs://b/r", *extra, env=env)
    calls = log.read_text().splitlines() if log.exists() else []
    return result, [call.split()[3] for call in calls]


def test_tpu_real_run_creates_ships_trains_and_deletes_even_on_failure(checkout, tmp_path):
    result, verbs = _run_tpu_with_stub(checkout, tmp_path, "", 7, "--delete", delete_rc=1)
    assert result.returncode == 7, result.stderr  # the training status, not the failed delete's
    assert "could not delete t1; delete it by hand" in result.stderr
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "delete"]
    with tarfile.open(tmp_path / "shipped.tar.gz") as tar:
        names = tar.getnames()
    assert "cclm_jax/configs/tiny.py" in names and "cclm_jax/launch/install.sh" in names
    assert not (tmp_path / "cclm_jax-t1.tar.gz").exists()  # local tarball removed after scp


def test_tpu_real_run_reuses_a_ready_vm(checkout, tmp_path):
    result, verbs = _run_tpu_with_stub(checkout, tmp_path, "READY", 0)
    assert result.returncode == 0, result.stderr
    assert verbs == ["describe", "scp", "ssh", "ssh", "ssh"]
    assert "reusing the TPU VM t1 (READY)" in result.stderr


def test_tpu_real_run_refuses_a_preempted_vm(checkout, tmp_path):
    result, verbs = _run_tpu_with_stub(checkout, tmp_path, "PREEMPTED", 0, "--delete")
    assert result.returncode == 2
    assert "exists but is PREEMPTED; delete it (gcloud compute tpus tpu-vm delete t1 --zone z)" in result.stderr
    assert verbs == ["describe"]


# ---- gpu.sh ------------------------------------------------------------------------------------
def _exports(stdout):
    return dict(cmd[1].split("=", 1) for cmd in commands(stdout) if cmd[0] == "export")


def test_gpu_dry_run_single_host(config_file):
    env = clean_env(XLA_FLAGS="--xla_dump_to=/tmp/dump")
    result = run_script("gpu.sh", "--config", config_file, "--workdir", "runs/a", "--gpus", "0,1",
                        "--mem-fraction", "0.8", "--dry-run", "--", "--config.seed=3", env=env)
    assert result.returncode == 0, result.stderr
    exports = _exports(result.stdout)
    flags = exports["XLA_FLAGS"].split()
    assert flags[0] == "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert flags[-1] == "--xla_dump_to=/tmp/dump"  # the user's flags come last, so they win
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8"
    assert exports["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert not any(k.startswith("JAX_") for k in exports)
    assert commands(result.stdout)[-1] == [
        "cclm-jax", "train", "--config", config_file, "--workdir", "runs/a", "--config.seed=3"]


def test_gpu_dry_run_multi_node_exports_coordinates(config_file, tmp_path):
    venv = str(tmp_path / "venv")
    result = run_script("gpu.sh", "--config", config_file, "--workdir", "gs://b/r", "--venv", venv,
                        "--coordinator", "10.0.0.1:1234", "--num-processes", "4", "--process-id",
                        "3", "--no-xla-flags", "--dry-run")
    assert result.returncode == 0, result.stderr
    exports = _exports(result.stdout)
    assert "XLA_FLAGS" not in exports
    assert exports["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert (exports["JAX_COORDINATOR_ADDRESS"], exports["JAX_NUM_PROCESSES"],
            exports["JAX_PROCESS_ID"]) == ("10.0.0.1:1234", "4", "3")
    assert commands(result.stdout)[-1] == [
        f"{venv}/bin/cclm-jax", "train", "--config", config_file, "--workdir", "gs://b/r",
        "--config.distributed=True"]


@pytest.mark.parametrize("extra,message", [
    (["--coordinator", "h:1", "--num-processes", "2"], "missing required option --process-id"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "option --process-id must be below --num-processes (2), got 2"),
    (["--coordinator", "h", "--num-processes", "2", "--process-id", "0"], "option --coordinator expects HOST:PORT"),
    (["--mem-fraction", "1.5"], "option --mem-fraction expects a number in (0, 1]"),
    (["--gpus", "0;1"], "option --gpus expects GPU indices"),
    (["--install"], "option --install needs --venv DIR"),
])
def test_gpu_rejects_bad_options(config_file, extra, message):
    result = run_script("gpu.sh", "--config", config_file, "--workdir", "w", *extra, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr


def test_gpu_rejects_a_missing_config_file(tmp_path):
    result = run_script("gpu.sh", "--config", "configs/absent.py:arg", "--workdir", "w", "--dry-run",
                        cwd=str(tmp_path))
    assert result.returncode == 2
    assert "option --config: no such file: configs/absent.py" in result.stderr


def test_gpu_install_dry_run_prints_the_install_commands(config_file, tmp_path):
    venv = str(tmp_path / "venv")
    result = run_script("gpu.sh", "--config", config_file, "--workdir", "w", "--venv", venv,
                        "--install", "--dry-run")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert cmds[0][1:] == ["-m", "venv", venv]
    assert [f"{venv}/bin/python", "-m", "pip", "install", "-e", f"{REPO}[gpu]"] in cmds
    assert cmds[-1][0] == f"{venv}/bin/cclm-jax"


def test_gpu_real_run_execs_the_trainer_with_the_environment(config_file, tmp_path):
    venv = tmp_path / "venv"
    write_stub(str(venv / "bin"), "cclm-jax",
               ARG_DUMP + 'printf "%s|%s" "$XLA_FLAGS" "$XLA_PYTHON_CLIENT_MEM_FRACTION" > "$ENV_FILE"\n')
    env = clean_env(ARGS_FILE=str(tmp_path / "args"), ENV_FILE=str(tmp_path / "env"))
    result = run_script("gpu.sh", "--config", config_file, "--workdir", "w", "--venv", str(venv),
                        "--", "--config.a=1", env=env)
    assert result.returncode == 0, result.stderr
    assert read_nul_args(tmp_path / "args") == [
        "train", "--config", config_file, "--workdir", "w", "--config.a=1"]
    flags, fraction = (tmp_path / "env").read_text().split("|")
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags.split()
    assert fraction == "0.90"

    no_cli = run_script("gpu.sh", "--config", config_file, "--workdir", "w", "--venv", str(tmp_path / "none"))
    assert no_cli.returncode == 2
    assert "none/bin/cclm-jax not found" in no_cli.stderr


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib(config_file):
    """XLA aborts on unknown flags, so a flag renamed in a new jaxlib must fail here first."""
    result = run_script("gpu.sh", "--config", config_file, "--workdir", "w", "--dry-run")
    flags = _exports(result.stdout)["XLA_FLAGS"]
    probe = [sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"]
    ok = subprocess.run(probe, capture_output=True, text=True, timeout=120,
                        env=clean_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run(probe, capture_output=True, text=True, timeout=120,
                         env=clean_env(XLA_FLAGS=flags + " --xla_gpu_no_such_flag=true", JAX_PLATFORMS="cpu"))
    assert bad.returncode != 0 and "xla_gpu_no_such_flag" in bad.stderr


# ---- slurm.sh ----------------------------------------------------------------------------------
def _slurm_args(config, out, *extra):
    return ["--nodes", "4", "--gpus-per-node", "4", "--partition", "gpu", "--time", "2-00:00:00",
            "--account", "lab", "--cpus-per-task", "32", "--job-name", "cclm-x", "--config", config,
            "--workdir", "runs/r1", "--venv", "/shared/env", "--out", out, *extra]


def test_slurm_writes_a_valid_sbatch_script_that_runs_srun(config_file, tmp_path):
    out = tmp_path / "job.sbatch"
    result = run_script("slurm.sh", *_slurm_args(config_file, str(out), "--", "--config.seed=5"),
                        cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    text = out.read_text()
    directives = re.findall(r"^#SBATCH (\S+)$", text, re.M)
    assert directives == ["--job-name=cclm-x", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4",
                          "--cpus-per-task=32", "--partition=gpu", "--account=lab", "--time=2-00:00:00",
                          "--output=%x-%j.out"]
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in text
    # Run the job script with a stub srun that records its arguments and environment.
    bin_dir = str(tmp_path / "bin")
    write_stub(bin_dir, "srun", ARG_DUMP + 'printf "%s|%s|%s" "$PWD" "$JAX_LOCAL_DEVICE_IDS" '
                                           '"$XLA_FLAGS" > "$ENV_FILE"\n')
    env = clean_env(bin_dir, ARGS_FILE=str(tmp_path / "args"), ENV_FILE=str(tmp_path / "env"),
                    XLA_FLAGS="--xla_dump_to=/d")
    job = subprocess.run(["bash", str(out)], capture_output=True, text=True, timeout=30, env=env)
    assert job.returncode == 0, job.stderr
    assert read_nul_args(tmp_path / "args") == [
        "--kill-on-bad-exit=1", "/shared/env/bin/cclm-jax", "train", "--config", config_file,
        "--workdir", str(tmp_path / "runs" / "r1"), "--config.distributed=True", "--config.seed=5"]
    cwd, device_ids, flags = (tmp_path / "env").read_text().split("|")
    assert (cwd, device_ids) == (REPO, "0,1,2,3")
    assert flags.split()[0] == "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert flags.split()[-1] == "--xla_dump_to=/d"


def test_slurm_dry_run_writes_nothing_and_prints_the_script(config_file, tmp_path):
    out = tmp_path / "job.sbatch"
    result = run_script("slurm.sh", *_slurm_args(config_file, str(out), "--submit", "--dry-run"))
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    lines = result.stdout.splitlines()
    assert lines[0] == f"+ cat > {out} <<'SBATCH_EOF'"
    assert lines[1] == "#!/bin/bash"
    assert lines[-2] == "SBATCH_EOF"
    assert commands(result.stdout)[-1] == ["sbatch", str(out)]
    # The printed lines are themselves a valid script.
    assert subprocess.run(["bash", "-n"], input="\n".join(line[2:] if line.startswith("+ ") else line
                                                           for line in lines), text=True).returncode == 0


def test_slurm_submit_calls_sbatch_on_the_written_file(config_file, tmp_path):
    out = tmp_path / "job.sbatch"
    bin_dir = str(tmp_path / "bin")
    write_stub(bin_dir, "sbatch", ARG_DUMP + 'echo "Submitted batch job 42"\n')
    env = clean_env(bin_dir, ARGS_FILE=str(tmp_path / "args"))
    result = run_script("slurm.sh", *_slurm_args(config_file, str(out), "--submit"), env=env)
    assert result.returncode == 0, result.stderr
    assert read_nul_args(tmp_path / "args") == [str(out)]
    assert "Submitted batch job 42" in result.stdout
    assert out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--nodes", "0"], "option --nodes expects a positive integer, got '0'"),
    (["--gpus-per-node", "x"], "option --gpus-per-node expects a positive integer"),
    (["--partition", "a b"], "option --partition must not contain whitespace"),
    (["--config", "configs/absent.py"], f"option --config: no such file: {REPO}/configs/absent.py"),
    (["--out", "/no/such/dir/job.sbatch"], "option --out: directory /no/such/dir does not exist"),
])
def test_slurm_rejects_bad_options(config_file, tmp_path, extra, message):
    result = run_script("slurm.sh", *_slurm_args(config_file, str(tmp_path / "j.sbatch")), *extra, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr


# ---- install.sh --------------------------------------------------------------------------------
def _python_stubs(bin_dir, too_old):
    """python3, python3.11 and python3.12 on PATH: either all too old, or real (this interpreter)."""
    for name in ("python3", "python3.11", "python3.12"):
        if too_old:
            write_stub(bin_dir, name, "exit 1\n")
        else:
            os.makedirs(bin_dir, exist_ok=True)
            os.symlink(sys.executable, os.path.join(bin_dir, name))


def test_install_creates_venv_with_a_recent_python(tmp_path):
    bin_dir = str(tmp_path / "bin")
    _python_stubs(bin_dir, too_old=False)
    venv = str(tmp_path / "v")
    result = run_script("install.sh", "--venv", venv, "--extra", "tpu,test", "--dry-run",
                        env=clean_env(bin_dir))
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == [
        ["python3.12", "-m", "venv", venv],
        [f"{venv}/bin/python", "-m", "pip", "install", "--upgrade", "pip"],
        [f"{venv}/bin/python", "-m", "pip", "install", "-e", f"{REPO}[tpu,test]"]]


def test_install_falls_back_to_uv_when_python_is_too_old(tmp_path):
    bin_dir = str(tmp_path / "bin")
    _python_stubs(bin_dir, too_old=True)
    venv = str(tmp_path / "v")
    result = run_script("install.sh", "--venv", venv, "--python", "3.12", "--dry-run",
                        env=clean_env(bin_dir))
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert cmds[:2] == [["python3", "-m", "pip", "install", "--user", "--upgrade", "uv"],
                        ["python3", "-m", "uv", "venv", "--seed", "--python", "3.12", venv]]
    assert cmds[-1] == [f"{venv}/bin/python", "-m", "pip", "install", "-e", REPO]


def test_install_reuses_an_existing_venv_and_checks_extras(tmp_path):
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")
    result = run_script("install.sh", "--venv", str(venv), "--extra", "gpu", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert [cmd[0] for cmd in commands(result.stdout)] == [f"{venv}/bin/python"] * 2
    assert "reusing the virtualenv" in result.stderr

    bad = run_script("install.sh", "--venv", str(venv), "--extra", "gpu,cuda", "--dry-run")
    assert bad.returncode == 2
    assert "option --extra: 'cuda' is not an extra in" in bad.stderr
