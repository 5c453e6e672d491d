"""lipsync-cluster: speech audio + template video -> lip-synced H.264/AAC mp4, on Ray."""

__version__ = "0.1.0"
