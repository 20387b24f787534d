"""Fine-tuning with the real medbox-trainer on the tiny model, through a real
medboxd and medboxctl: SIGKILL of medboxd in the middle of a job (the next
medboxd stops the trainer the dead one left behind, resumes the job from its
last checkpoint, and the job finishes with the loss curve of an uninterrupted
run), a distillation whose student is loaded and answers, and a LoRA adapter
served on the engine of its base model, beside it."""

import concurrent.futures
import contextlib
import json
import random
import signal
import subprocess

from conftest import BIN_DIR, Medboxd

CONFIG = "[finetune]\ncheckpoint_every = 4\ncancel_grace_seconds = 10\n"


def lab_flag_dataset(path, count=160, seed=7):
    """Potassium value -> flag, as alpaca lines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        value = round(rng.uniform(2.5, 6.5), 1)
        flag = "L" if value < 3.5 else "H" if value > 5.3 else "N"
        lines.append(json.dumps({"instruction": "Flag this potassium (mmol/L)", "input": f"K {value}", "output": flag}))
    path.write_text("\n".join(lines) + "\n")


class Ctl:
    def __init__(self, server):
        self.server = server

    def args(self, *args):
        return [str(BIN_DIR / "medboxctl"), "--addr", self.server.addr, "--key", self.server.admin_key, "--json", *args]

    def __call__(self, *args):
        result = subprocess.run(self.args(*args), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"medboxctl {' '.join(args)}: {result.stderr}"
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def losses(events):
    """step -> every loss reported for it (a resumed job repeats the steps after its checkpoint)."""
    by_step = {}
    for event in events:
        if event["kind"] == "progress":
            by_step.setdefault(event["step"], []).append(event["loss"])
    return by_step


def create(ctl, output):
    return ctl("finetune", "create", "--base", "medical", "--dataset", "k-flags", "--method", "lora",
               "--epochs", "2", "--batch-size", "4", "--seed", "11", "--output", output)[0]["id"]


def test_sigkill_of_medboxd_mid_job_resumes_with_the_same_losses(tmp_path):
    server = Medboxd(tmp_path, "sqlite", extra_config=CONFIG)
    try:
        ctl = Ctl(server)
        dataset = tmp_path / "k.jsonl"
        lab_flag_dataset(dataset)
        ctl("datasets", "upload", str(dataset), "--name", "k-flags", "--format", "alpaca")

        # The reference: the job run without interruption.
        reference_id = create(ctl, "k-reference")
        reference = ctl("finetune", "watch", reference_id)
        assert reference[-1]["state"] == "succeeded", reference[-1]
        reference_losses = losses(reference)
        total = max(reference_losses)
        assert total >= 30, f"{total} steps leave no room to kill it mid-job"

        # The same job again; medboxd dies at its second checkpoint.
        job_id = create(ctl, "k-killed")
        watch = subprocess.Popen(ctl.args("finetune", "watch", job_id), stdout=subprocess.PIPE, text=True)
        checkpoints = 0
        for line in watch.stdout:
            event = json.loads(line)
            if event["kind"] == "checkpoint":
                checkpoints += 1
                if checkpoints == 2:
                    killed_at = event["step"]
                    break
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        watch.kill()
        watch.wait()
        assert killed_at < total
        print(f"killed medboxd at the checkpoint of step {killed_at} of {total}")
    finally:
        server.terminate(signal_it=False)

    restarted = Medboxd(tmp_path, "sqlite", extra_config=CONFIG, log_name="medboxd-restarted.log")
    try:
        ctl = Ctl(restarted)
        events = ctl("finetune", "watch", job_id)
        assert events[-1]["kind"] == "state" and events[-1]["state"] == "succeeded", restarted.log_text()
        resumed = [e for e in events if e["kind"] == "state" and e["state"] == "running"]
        assert len(resumed) == 2 and "resum" in resumed[1]["message"], resumed
        job = next(j for j in ctl("finetune", "list") if j["id"] == job_id)
        assert job["attempts"] == 2
        after_restart = events.index(resumed[1])
        first_step_after = next(e["step"] for e in events[after_restart:] if e["kind"] == "progress")
        print(f"the restarted medboxd resumed at step {first_step_after}")
        assert first_step_after > killed_at, f"resumed from a checkpoint at or after step {killed_at}, not from scratch"

        # Every step, whichever run reported it, has the uninterrupted run's loss.
        killed_losses = losses(events)
        assert sorted(killed_losses) == sorted(reference_losses)
        # The same seed gives the same curve to the bit.
        for step, reported in killed_losses.items():
            assert set(reported) == set(reference_losses[step]), f"step {step}: {reported} vs {reference_losses[step]}"
        code = restarted.terminate()
        assert code == 0, restarted.log_text()
    finally:
        if restarted.proc.poll() is None:
            restarted.proc.kill()
            restarted.proc.wait()


@contextlib.contextmanager
def small_server(tmp_path):
    """A medboxd with the real trainer, killed if a test leaves it running."""
    server = Medboxd(tmp_path, "sqlite", extra_config=CONFIG)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def train_small(ctl, tmp_path, *arguments):
    """Uploads 40 lab examples as `k-flags`, runs `finetune create` on them
    with `arguments` and watches the job to success; returns its id."""
    dataset = tmp_path / "k.jsonl"
    lab_flag_dataset(dataset, count=40)
    ctl("datasets", "upload", str(dataset), "--name", "k-flags", "--format", "alpaca")
    job_id = ctl("finetune", "create", "--base", "medical", "--dataset", "k-flags", "--epochs", "1",
                 "--batch-size", "4", *arguments)[0]["id"]
    events = ctl("finetune", "watch", job_id)
    assert events[-1]["state"] == "succeeded", events[-1]
    return job_id


def test_a_distilled_student_is_registered_loaded_and_answers(tmp_path, pb):
    with small_server(tmp_path) as server:
        ctl = Ctl(server)
        job_id = train_small(ctl, tmp_path, "--teacher", "tiny", "--method", "distill", "--output", "k-student")
        job = next(j for j in ctl("finetune", "list") if j["id"] == job_id)
        assert (job["model_version"], job["model_kind"]) == (1, "merged")
        log = (server.data_dir / "jobs" / job_id / "trainer.log").read_text()
        assert "distilling token by token" in log

        ctl("models", "load", "k-student")
        stub = pb.inference_pb2_grpc.InferenceStub(server.channel)
        reply = stub.Generate(pb.inference_pb2.GenerateRequest(
            model="k-student", prompt="K 6.1", sampling=pb.inference_pb2.SamplingParams(max_tokens=4, temperature=0.0)), timeout=60)
        assert reply.usage.completion_tokens >= 1
        assert server.terminate() == 0, server.log_text()


def test_a_lora_adapter_is_served_on_its_base_models_engine(tmp_path, pb):
    with small_server(tmp_path) as server:
        ctl = Ctl(server)
        train_small(ctl, tmp_path, "--method", "lora", "--lr", "1e-2", "--output", "k-lab")

        loaded = ctl("models", "load", "k-lab")[0]
        assert loaded["base_model"] == "tiny", loaded
        listed = {model["name"]: model for model in ctl("models", "list")}
        assert listed["k-lab"]["state"] == "ready" and listed["k-lab"]["base_model"] == "tiny"
        assert listed["tiny"]["base_model"] == ""
        assert "attaching the adapter to its base model's engine" in server.log_text()

        # The base and its adapter answer at the same time, from one engine.
        stub = pb.inference_pb2_grpc.InferenceStub(server.channel)
        def generate(model):
            return stub.Generate(pb.inference_pb2.GenerateRequest(
                model=model, prompt="K 6.1",
                sampling=pb.inference_pb2.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
                timeout=60).token_ids
        alone = {model: list(generate(model)) for model in ("tiny", "k-lab")}
        assert alone["tiny"] != alone["k-lab"], "the adapter changes the answer"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            models = ["tiny", "k-lab"] * 4
            together = list(pool.map(generate, models))
        assert [list(ids) for ids in together] == [alone[model] for model in models]

        refused = subprocess.run(Ctl(server).args("models", "unload", "tiny"), capture_output=True, text=True)
        assert refused.returncode != 0 and "`k-lab`" in refused.stderr, refused.stderr
        ctl("models", "unload", "k-lab")
        ctl("models", "unload", "tiny")
        assert server.terminate() == 0, server.log_text()
