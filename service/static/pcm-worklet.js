// The Live tab's microphone capture, on the audio thread: the input's channels averaged to mono,
// resampled (linear interpolation) from the AudioContext's rate to `targetRate` when they differ,
// converted to PCM s16le and posted to the page in chunks of `chunkSamples` (the page sends each
// chunk as one binary WebSocket message).
"use strict";

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.step = sampleRate / o.targetRate; // input samples per output sample
    this.chunk = new Int16Array(o.chunkSamples);
    this.filled = 0;
    this.position = 0; // of the next output sample, in input samples from the current block's start
    this.previous = 0; // the last input sample of the previous block (position -1)
    this.port.onmessage = (e) => {
      if (e.data === "flush") this.flush();
    };
  }

  emit(value) {
    const v = value < -1 ? -1 : value > 1 ? 1 : value;
    this.chunk[this.filled++] = v < 0 ? v * 0x8000 : v * 0x7fff;
    if (this.filled === this.chunk.length) this.flush();
  }

  flush() {
    if (!this.filled) return;
    const out = this.chunk.slice(0, this.filled);
    this.port.postMessage(out.buffer, [out.buffer]);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || !channels.length) return true;
    const n = channels[0].length;
    let mono = channels[0];
    if (channels.length > 1) {
      mono = new Float32Array(n);
      for (const channel of channels) for (let i = 0; i < n; i++) mono[i] += channel[i] / channels.length;
    }
    if (this.step === 1) {
      for (let i = 0; i < n; i++) this.emit(mono[i]);
      return true;
    }
    let t = this.position;
    while (t <= n - 1) {
      const i = Math.floor(t);
      const f = t - i;
      const a = i < 0 ? this.previous : mono[i];
      const b = i + 1 < n ? mono[i + 1] : a;
      this.emit(a + (b - a) * f);
      t += this.step;
    }
    this.position = t - n;
    this.previous = mono[n - 1];
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
