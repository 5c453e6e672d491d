"""Media I/O: ffmpeg resolution, probing, template normalisation, decode, encode, finalise."""
