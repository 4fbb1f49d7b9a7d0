"""What a resumed run leaves besides its weights: ``metrics.jsonl`` and TensorBoard hold each
step's record once (the records a killed run wrote after its last checkpoint are redone, not
repeated), the records' ``time`` goes on across the resume, and the model package / report of a
run resumed after its last step still carry its final metrics. In-process, tiny stand-in model;
a "kill" is an exception out of a step (the records already written stay on disk, as after a
SIGKILL)."""

from __future__ import annotations

import json
import signal
import time

import pytest

from qualiface.config import from_dict
from qualiface.train.checkpoint import load_checkpoint, save_checkpoint
from qualiface.train.loop import Trainer, TrainingInterrupted
from stand_ins import Blobs, LinearBackbone  # noqa: F401  (registers test-linear / test-blobs)


class Killed(Exception):
    pass


def settings(out, resume=False, **train) -> dict:
    values = {"steps": 8, "batch_size": 8, "device": "cpu", "output_dir": str(out), "log_every": 1,
              "checkpoint_every": 4, "progress": False, "seed": 3, "resume": resume}
    values.update(train)
    return {
        "model": {"backbone": "test-linear", "params": {}},
        "head": {"name": "adaface", "params": {}},
        "data": {"name": "test-blobs", "params": {"num": 48}, "num_workers": 0},
        "optim": {"lr": 0.1},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": values,
    }


def stopped_run(out, at_step: int, how: str, pause: float = 0.0, **train) -> None:
    """Run until step ``at_step`` completes, then die (``kill``: no checkpoint, the log as it
    is) or get SIGTERM (``term``: the loop writes a checkpoint and stops). The first step takes
    ``pause`` seconds longer (a run whose clock is well ahead of a new process's)."""
    trainer = Trainer(from_dict(settings(out, **train)))
    step = trainer.train_step

    def stopping(micro_batches):
        result = step(micro_batches)
        if trainer.global_step == 0:
            time.sleep(pause)
        if trainer.global_step + 1 == at_step:
            if how == "kill":
                raise Killed
            trainer._stop_signal = signal.SIGTERM
        return result

    trainer.train_step = stopping
    with pytest.raises(Killed if how == "kill" else TrainingInterrupted):
        trainer.run()
    trainer.logger.close()  # what the process's death would do


def records(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # time and throughput are wall-clock: everything else must match the uninterrupted run
    return [{k: v for k, v in row.items() if k not in ("time", "images_per_s")} for row in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    Trainer(from_dict(settings(out))).run()
    return out


@pytest.mark.parametrize("kill_after", [2, 6], ids=["before-any-checkpoint", "after-a-checkpoint"])
def test_a_killed_and_resumed_run_logs_every_step_once(straight, tmp_path, kill_after):
    out = tmp_path / "run"
    stopped_run(out, kill_after + 1, "kill")  # steps 1..kill_after logged, then the kill
    Trainer(from_dict(settings(out, resume=True))).run()
    assert records(out) == records(straight)


def test_metrics_written_after_the_last_checkpoint_are_dropped_before_the_resume_notes(tmp_path):
    out = tmp_path / "run"
    stopped_run(out, 7, "kill", checkpoint_every=2)  # checkpoints at 2, 4, 6; records 1-6
    (out / "checkpoint.pt").write_bytes(b"torn")  # falls back to the previous checkpoint (step 4)
    Trainer(from_dict(settings(out, resume=True, checkpoint_every=2))).run()
    steps = [(row["kind"], row["step"]) for row in records(out)]
    assert steps[:4] == [("train", 1), ("train", 2), ("train", 3), ("train", 4)]
    assert steps[4][0] == "event" and "warning" in records(out)[4]["message"]  # the fallback note
    assert steps[5:] == [("train", s) for s in range(5, 9)]


def test_a_run_stopped_at_its_last_step_keeps_its_final_metrics(straight, tmp_path):
    out = tmp_path / "run"
    stopped_run(out, 8, "term")  # SIGTERM during the last step: checkpoint at step 8
    result = Trainer(from_dict(settings(out, resume=True))).run()
    def package_metrics(run):
        return json.loads((run / "model" / "model.json").read_text())["metadata"]["last_metrics"]

    expected = package_metrics(straight)
    assert expected["loss"] > 0 and result.last_metrics == expected
    assert package_metrics(out) == expected
    assert records(out) == records(straight)


def killed_and_resumed(out, older_checkpoint: bool = False) -> None:
    """Steps 1-6 logged, the kill in step 7, the resume from the checkpoint of step 4 (steps
    5-8 redone). The first step is a second slow, so the killed run's clock is ahead of the
    resumed process's and the two event files are named in different seconds (TensorBoard
    reads them in name order, as after a real restart). ``older_checkpoint``: as written before
    the checkpoint held ``elapsed_s``."""
    stopped_run(out, 7, "kill", pause=1.1)
    if older_checkpoint:
        state = load_checkpoint(out / "checkpoint.pt")
        state.pop("elapsed_s", None)
        save_checkpoint(out / "checkpoint.pt", state)
    Trainer(from_dict(settings(out, resume=True))).run()


def tensorboard_scalars(out, tag: str = "train/loss") -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` as TensorBoard shows the run (it applies the purges)."""
    accumulators = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulators.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_shows_each_step_once_after_a_kill_and_resume(straight, tmp_path):
    out = tmp_path / "run"
    killed_and_resumed(out)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per run
    assert [step for step, _ in tensorboard_scalars(out)] == list(range(1, 9))
    assert tensorboard_scalars(out) == tensorboard_scalars(straight)


@pytest.mark.parametrize("older_checkpoint", [False, True], ids=["elapsed_s", "older-checkpoint"])
def test_the_time_field_goes_on_across_a_resume(tmp_path, older_checkpoint):
    out = tmp_path / "run"
    killed_and_resumed(out, older_checkpoint)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "train"] == list(range(1, 9))
    times = [row["time"] for row in rows]
    # the resumed records count on from the killed run's (its slow first step included)
    assert times == sorted(times) and times[-1] >= 1.1


def test_a_record_logged_after_the_checkpoint_of_its_own_step_shows_once(tmp_path):
    # The final checkpoint is saved at the last step, then the final validation is logged at
    # that same step. A kill after the validation and a resume redo it: TensorBoard showed it
    # twice (the purge began one step later), or, purged from that step, lost the train record
    # logged before the checkpoint. Both must appear once, as in metrics.jsonl.
    from qualiface.train.logging import MetricsLogger

    out = tmp_path / "run"
    killed = MetricsLogger(out)
    for step in (1, 2):
        killed.log(step, {"loss": 3.0 - step})
    offset = killed.offset()  # the checkpoint at step 2
    killed.log(2, {"accuracy": 0.25}, kind="val")
    killed.log(2, {"message": "killed after this"}, kind="event")
    killed.close()
    time.sleep(1.1)  # the resumed run's event file is named one second later, as in real life

    resumed = MetricsLogger(out)
    resumed.resume(offset, step=2, elapsed=5.0)
    resumed.log(2, {"accuracy": 0.75}, kind="val")
    resumed.close()
    assert tensorboard_scalars(out, "train/loss") == [(1, 2.0), (2, 1.0)]
    assert tensorboard_scalars(out, "val/accuracy") == [(2, 0.75)]
    assert [(row["kind"], row["step"]) for row in records(out)] == [("train", 1), ("train", 2), ("val", 2)]
