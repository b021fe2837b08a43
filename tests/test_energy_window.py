"""measure.energy on a simulated NVML energy counter: a window between two counter updates reads the true power,
where a window between arbitrary times (the old 0.5 s read) is off by up to one update at each end."""
import pytest

from measure import energy


class Board:
    """A board drawing `watts` whose energy counter (mJ) is updated every `period_s`; time advances by the work."""

    def __init__(self, watts, period_s, chunk_s=0.004, offset_s=0.0137):
        self.t, self.watts, self.period, self.chunk = offset_s, watts, period_s, chunk_s

    def clock(self):
        return self.t

    def counter(self):
        updates = int(self.t / self.period)  # the counter holds the energy at its last update
        return updates * self.period * self.watts * 1e3

    def work(self):
        self.t += self.chunk


@pytest.mark.parametrize("watts, period", [(700.0, 0.1), (420.0, 0.02), (95.0, 0.05)])
def test_a_window_between_updates_reads_the_true_power(watts, period):
    b = Board(watts, period)
    p = energy.board_power(b.counter, b.work, window_s=2.0, clock=b.clock)
    assert p.window_s >= 2.0
    assert p.watts == pytest.approx(watts, rel=b.chunk / p.window_s * 2)


def test_a_short_unaligned_window_is_what_misread():
    """The failure the window fixes: half a second read at arbitrary times (here just before one counter update
    and just after another), with a 100 ms counter, reads 700 W as over 800 W."""
    b = Board(700.0, 0.1, offset_s=0.098)
    e0, t0 = b.counter(), b.clock()
    while b.clock() < 0.601:
        b.work()
    assert (b.counter() - e0) / 1e3 / (b.clock() - t0) > 800


def test_no_energy_counter_gives_no_reading():
    b = Board(700.0, 0.1)
    assert energy.board_power(lambda: None, b.work, clock=b.clock) is None
    frozen = energy.board_power(lambda: 5.0, b.work, clock=b.clock)  # a counter that never moves
    assert frozen is None


def test_idle_power_sleeps_between_reads():
    b = Board(80.0, 0.05)
    p = energy.idle_power(b.counter, window_s=1.0, clock=b.clock, sleep=lambda s: b.work())
    assert p.watts == pytest.approx(80.0, rel=0.02)
