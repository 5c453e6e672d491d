"""Live sessions: speech streamed in, a lip-synced live HLS stream out.

Plain Python (no Ray), in the order the data flows:
- `cluster.live.speech`: PCM in (16/24/48 kHz) -> 16 kHz speech -> mel columns as soon as they are
  final (only the lookahead the model's window needs);
- `cluster.live.schedule`: one decision per output frame: the next speech frame when one is
  ready, else an idle frame (silent mouth); the template's ping-pong phase runs on regardless;
- `cluster.live.encoder`: one long-lived ffmpeg per session writing a live HLS playlist of
  short fMP4 segments (video + audio), and the whole session as one verified mp4 at the end;
- `cluster.live.session`: the render loop that ties them together at real-time pace, with
  latency and stall figures.
"""
