"""Callback delivery without Ray: the retry schedule, and the count of tries kept across restarts."""
import asyncio

import pytest

from cluster.callbacks import CallbackStore, deliver, retry_delay_s, retry_window_s
from cluster.config import Settings
from cluster.netguard import UrlFetchError


def test_a_failing_callback_is_retried_for_most_of_an_hour_by_default():
    # 5 tries over 7.5 s lost the callback of a receiver down for a deploy
    assert [retry_delay_s(n) for n in (1, 2, 3, 9, 10, 11, 30)] == [0.5, 1, 2, 128, 256, 300, 300]
    window = retry_window_s(Settings().callback_attempts)
    assert 45 * 60 <= window <= 60 * 60, window
    assert retry_window_s(1) == 0


class Receiver:
    """What `post` answers, in turn: an HTTP status or an exception; the waits asked for."""

    def __init__(self, *answers):
        self.answers, self.posts, self.waits = list(answers), 0, []

    async def post(self) -> int:
        self.posts += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sleep(self, s: float) -> None:
        self.waits.append(s)


def test_a_callback_is_delivered_after_failures_and_each_try_is_recorded(tmp_path):
    store = CallbackStore(tmp_path / "callbacks.sqlite3")
    store.add("j1", "http://receiver/hook")
    rx = Receiver(503, UrlFetchError("callback_url: POST to http://receiver/hook failed: ConnectError"), 200)
    assert asyncio.run(deliver("j1", "http://receiver/hook", rx.post, store, attempts=5, sleep=rx.sleep))
    record = store.get("j1")
    assert (record["state"], record["attempts"], record["last_error"]) == ("delivered", 3, None)
    assert rx.waits == [0.5, 1.0] and store.pending() == []


def test_a_restart_goes_on_counting_a_callbacks_tries(tmp_path):
    store = CallbackStore(tmp_path / "callbacks.sqlite3")
    store.add("j2", "http://receiver/hook")
    first = Receiver(500, 500)

    class Stopped(Exception):
        pass

    async def stop_at_second_wait(s):  # the service stops while the callback waits for its third try
        await first.sleep(s)
        if len(first.waits) == 2:
            raise Stopped

    with pytest.raises(Stopped):
        asyncio.run(deliver("j2", "http://receiver/hook", first.post, store, attempts=4, sleep=stop_at_second_wait))
    assert store.pending() == [("j2", "http://receiver/hook", 2)]
    # after the restart: two tries are left of four, not four again; the first waits as the third would
    again = Receiver(500, 500, 200)
    tried = store.pending()[0][2]
    assert not asyncio.run(deliver("j2", "http://receiver/hook", again.post, store, attempts=4, tried=tried,
                                   sleep=again.sleep))
    assert again.posts == 2 and again.waits == [2.0]
    record = store.get("j2")
    assert (record["state"], record["attempts"], record["last_error"]) == ("failed", 4, "HTTP 500")
    # a setting lowered below the tries already made leaves one last try, not none
    store.add("j3", "http://receiver/hook")
    for _ in range(6):
        store.attempt("j3", "HTTP 502", final=False)
    last = Receiver(200)
    assert asyncio.run(deliver("j3", "http://receiver/hook", last.post, store, attempts=3, tried=6, sleep=last.sleep))
    assert last.posts == 1 and store.get("j3")["state"] == "delivered"

