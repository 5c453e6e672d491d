"""The ingress's cache of live streams (`service.stream_cache`), without Ray: many viewers, one read."""
import asyncio

import pytest

from service.stream_cache import StreamCache

PLAYLIST = (b'#EXTM3U\n#EXT-X-MAP:URI="init.mp4"\n#EXTINF:0.48,\nseg_000007.m4s?token=t\n'
            b'#EXT-X-PART:DURATION=0.48,URI="seg_000008.m4s",INDEPENDENT=YES\n')


def test_many_viewers_waiting_on_a_playlist_share_one_read_of_it():
    """Each viewer's blocking reload asked the session's actor (which renders the stream) 25 times a second."""
    cache, stale = StreamCache(fresh_s=10), StreamCache(fresh_s=0)
    reads = []

    async def read():
        reads.append(1)
        await asyncio.sleep(0.05)
        return PLAYLIST

    async def scenario():
        answers = await asyncio.gather(*(cache.playlist("s1", read) for _ in range(30)))
        assert answers == [PLAYLIST] * 30 and len(reads) == 1
        assert await cache.playlist("s1", read) == PLAYLIST and len(reads) == 1  # read within fresh_s
        await cache.playlist("s2", read)
        assert len(reads) == 2  # another session's own
        await stale.playlist("s1", read)
        await stale.playlist("s1", read)
        assert len(reads) == 4  # past fresh_s: read again

    asyncio.run(scenario())


def test_a_failed_playlist_read_is_not_handed_to_later_requests():
    cache = StreamCache(fresh_s=10)
    answers = [RuntimeError("the actor restarts"), PLAYLIST]

    async def read():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario():
        with pytest.raises(RuntimeError):
            await cache.playlist("s1", read)
        assert await cache.playlist("s1", read) == PLAYLIST

    asyncio.run(scenario())


def test_listed_segments_are_read_once_and_others_each_time_and_the_bytes_stay_bounded():
    """A segment a playlist listed is immutable (kept); one not listed yet may be written again by a takeover's
    encoder (not kept)."""
    cache = StreamCache(max_bytes=2500)
    reads: list[str] = []

    def reader(name: str, size: int = 1000):
        async def read():
            reads.append(name)
            return name.encode().ljust(size, b".")
        return read

    async def scenario():
        async def playlist():
            return PLAYLIST
        await cache.playlist("s1", playlist)
        for _ in range(3):
            assert (await cache.file("s1", "seg_000007.m4s", reader("seg_000007.m4s"))).startswith(b"seg_000007")
            await cache.file("s1", "seg_000009.m4s", reader("seg_000009.m4s"))  # not listed
            await cache.file("s1", "init.mp4", reader("init.mp4"))
        assert reads.count("seg_000007.m4s") == 1 and reads.count("init.mp4") == 1
        assert reads.count("seg_000009.m4s") == 3
        await cache.file("s1", "seg_000008.m4s", reader("seg_000008.m4s"))  # 3000 bytes listed: the oldest goes
        assert cache.bytes <= 2500 and ("s1", "seg_000007.m4s") not in cache._files
        assert ("s1", "seg_000008.m4s") in cache._files and ("s1", "init.mp4") in cache._files
        cache.forget("s1")
        assert cache.bytes == 0 and not cache._files

    asyncio.run(scenario())


def test_a_shared_read_that_fails_after_its_waiters_gave_up_is_not_left_unretrieved(caplog):
    cache = StreamCache(fresh_s=10)

    async def read():
        await asyncio.sleep(0.1)
        raise RuntimeError("the session's actor did not come back")

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache.playlist("s1", read), 0.02)
        await asyncio.sleep(0.3)

    import gc

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(scenario())
        gc.collect()
    assert "never retrieved" not in caplog.text, caplog.text


def test_the_shared_read_runs_in_a_context_of_its_own_not_the_first_viewers():
    """A review: the shared read was made in the context of the request that started it, so Ray, cancelling the
    calls of a request Serve cancelled (that first viewer leaving), cancelled the read every viewer awaited. It
    sees none of that request's context variables now (Ray's task of the request among them)."""
    import contextvars

    request = contextvars.ContextVar("request", default=None)
    seen = []

    async def read():
        seen.append(request.get())
        return PLAYLIST

    async def first_viewer():
        request.set("viewer-1")
        return await StreamCache().playlist("s1", read)

    assert asyncio.run(first_viewer()) == PLAYLIST and seen == [None]


def test_a_hedged_session_call_whose_request_was_cancelled_leaves_no_unretrieved_error():
    """A review: after the hedge (0.25 s), a viewer that left had its request cancelled, `asyncio.wait` did not pass
    that on to the two calls, and Ray's cancellation of them ended each with an error nobody retrieved (asyncio's
    "never retrieved" lines). They are cancelled with the request now, and their outcomes taken."""
    import gc

    from ray.exceptions import TaskCancelledError

    from service.routers import sessions

    async def cancelled_call():
        await asyncio.sleep(0.35)
        raise TaskCancelledError()

    actor = type("Actor", (), {"read_hls": type("M", (), {"remote": staticmethod(lambda *a: cancelled_call())})()})
    actors = type("Actors", (), {"current": actor(), "partner": lambda self: actor()})()

    async def scenario():
        unretrieved = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, c: unretrieved.append(c.get("message")))
        request = asyncio.ensure_future(sessions._hedged(actors, "read_hls", (), 5.0))
        await asyncio.sleep(0.3)  # hedged at 0.25 s; the viewer leaves
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.6)
        gc.collect()
        await asyncio.sleep(0)
        return unretrieved

    assert asyncio.run(scenario()) == []
