"""A profile of a window of training steps: a `jax.profiler` trace (`.xplane.pb`) that
xprof, or TensorBoard's profile tab (tensorboard-plugin-profile), opens.

clu's `periodic_actions.Profile` does this too, but importing it imports TensorFlow
(through clu's metric writers), which we do not require; see train/metrics.py.
"""

from absl import logging
import jax


class ProfileWindow:
    """Traces steps first_step + 1 ... first_step + num_steps into `logdir`.

    Call `begin(steps_done)` once before the run's first step, `after_step(steps_done)` after
    every step, once its results are on the host (so the trace holds whole steps), and
    `stop()` when the run ends for any reason: a run that stops inside the window keeps the
    trace of the steps it did, and a run resumed inside it traces the steps left.
    """

    def __init__(self, logdir: str, first_step: int, num_steps: int, total_steps: int):
        if first_step < 1 or num_steps < 1 or first_step + num_steps > total_steps:
            raise ValueError(f"profile.first_step={first_step}, profile.num_steps={num_steps}: the window must start "
                             f"after step 1 or later and end by the run's last step ({total_steps})")
        self.logdir, self.first_step, self.num_steps = logdir, first_step, num_steps
        self.running = False

    @property
    def last_step(self) -> int:
        return self.first_step + self.num_steps

    def begin(self, steps_done: int) -> None:
        """Starts the trace if a run resumed after `steps_done` steps is inside the window (0 on a
        fresh run); says so if it is past it."""
        if self.first_step <= steps_done < self.last_step:
            self._start(steps_done)
        elif steps_done >= self.last_step:
            logging.warning("the run resumed after step %d, past the profile window (steps %d-%d): nothing is "
                            "profiled", steps_done, self.first_step + 1, self.last_step)

    def after_step(self, steps_done: int) -> None:
        if steps_done == self.first_step:
            self._start(steps_done)
        elif steps_done == self.last_step:
            self.stop()

    def _start(self, steps_done: int) -> None:
        jax.profiler.start_trace(self.logdir)
        self.running = True
        logging.info("profiling steps %d-%d into %s", steps_done + 1, self.last_step, self.logdir)

    def stop(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False
            logging.info("wrote the profile to %s/plugins/profile", self.logdir)
