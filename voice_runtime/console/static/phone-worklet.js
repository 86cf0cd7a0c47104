// Audio thread of the browser phone: microphone -> 8 kHz mu-law frames, and agent audio
// (8 kHz mu-law) -> speakers through a Twilio-like playback queue of audio and marks.
// Marks are posted back only when every sample queued before them has been played;
// "clear" drops queued audio and posts every pending mark, as Twilio does.

const FRAME = 160; // 20 ms at 8 kHz
const LINE_RATE = 8000;

// G.711 mu-law decode table (256 entries), built once.
const ULAW_TO_FLOAT = new Float32Array(256);
for (let i = 0; i < 256; i++) {
  const u = ~i & 0xff;
  const exponent = (u >> 4) & 7;
  const magnitude = ((((u & 0x0f) << 3) + 0x84) << exponent) - 0x84;
  ULAW_TO_FLOAT[i] = ((u & 0x80) ? -magnitude : magnitude) / 32768;
}

function floatToUlaw(x) {
  let s = Math.round(Math.max(-1, Math.min(1, x)) * 32767);
  const sign = s < 0 ? 0x80 : 0;
  if (s < 0) s = -s;
  if (s > 32635) s = 32635;
  s += 0x84;
  let exponent = 7;
  for (let mask = 0x4000; (s & mask) === 0 && exponent > 0; mask >>= 1) exponent--;
  const mantissa = (s >> (exponent + 3)) & 0x0f;
  return ~(sign | (exponent << 4) | mantissa) & 0xff;
}

// Windowed-sinc low-pass (Blackman) at `cutoff` Hz for input rate `rate`: the anti-alias
// filter before taking 8 kHz samples out of the microphone's 44.1/48 kHz stream.
function lowpass(cutoff, rate, taps) {
  const h = new Float32Array(taps);
  const fc = cutoff / rate;
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const n = i - mid;
    const sinc = n === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * n) / (Math.PI * n);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) +
      0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

class PhoneIO extends AudioWorkletProcessor {
  constructor() {
    super();
    // Capture: filter, then interpolate the filtered signal at 8 kHz positions.
    this.taps = lowpass(3600, sampleRate, 95);
    this.history = new Float32Array(this.taps.length * 2);
    this.histPos = 0;
    this.step = sampleRate / LINE_RATE; // input samples per line sample
    this.next = 0; // input position of the next line sample
    this.index = 0; // input position of the newest filtered sample
    this.prev = 0;
    this.frame = new Uint8Array(FRAME);
    this.fill = 0;
    this.capturing = false;
    // Playback: a FIFO of {pcm: Float32Array} and {mark: name}, read at 8 kHz.
    this.queue = [];
    this.offset = 0; // fractional read position in the head chunk
    this.rate = LINE_RATE / sampleRate; // line samples per output sample
    this.playing = false;
    this.played = 0; // line samples played so far
    // Level meters: RMS over ~50 ms windows.
    this.meterEvery = Math.round(sampleRate / 20);
    this.meterCount = 0;
    this.micSq = 0;
    this.outSq = 0;
    this.port.onmessage = (e) => this.command(e.data);
  }

  command(msg) {
    if (msg.play) {
      const bytes = new Uint8Array(msg.play);
      const pcm = new Float32Array(bytes.length);
      for (let i = 0; i < bytes.length; i++) pcm[i] = ULAW_TO_FLOAT[bytes[i]];
      this.queue.push({ pcm });
    } else if (msg.mark !== undefined) {
      this.queue.push({ mark: msg.mark });
    } else if (msg.clear) {
      // Twilio: drop the buffered audio and return every pending mark, in order.
      for (const item of this.queue) {
        if (item.mark !== undefined) this.port.postMessage({ mark: item.mark, cleared: true });
      }
      this.queue = [];
      this.offset = 0;
    } else if (msg.capture !== undefined) {
      this.capturing = msg.capture;
      this.fill = 0;
    }
  }

  capture(input) {
    const taps = this.taps;
    const n = taps.length;
    const hist = this.history;
    for (let i = 0; i < input.length; i++) {
      const x = input[i];
      this.micSq += x * x;
      // Ring buffer written twice so the convolution reads one contiguous window.
      hist[this.histPos] = x;
      hist[this.histPos + n] = x;
      this.histPos = (this.histPos + 1) % n;
      let y = 0;
      for (let k = 0; k < n; k++) y += taps[k] * hist[this.histPos + k];
      this.index += 1;
      while (this.next <= this.index) {
        const frac = this.next - (this.index - 1);
        const v = this.prev + (y - this.prev) * frac;
        this.next += this.step;
        if (!this.capturing) continue;
        this.frame[this.fill++] = floatToUlaw(v);
        if (this.fill === FRAME) {
          const out = this.frame.slice(0);
          this.port.postMessage({ frame: out.buffer }, [out.buffer]);
          this.fill = 0;
        }
      }
      this.prev = y;
      if (this.index > 1e6) {
        this.index -= 1e6;
        this.next -= 1e6;
      }
    }
  }

  playback(out) {
    for (let i = 0; i < out.length; i++) {
      let sample = 0;
      while (this.queue.length) {
        const head = this.queue[0];
        if (head.mark !== undefined) {
          // Everything queued before this mark has been played.
          this.port.postMessage({ mark: head.mark });
          this.queue.shift();
          continue;
        }
        const pos = Math.floor(this.offset);
        if (pos >= head.pcm.length) {
          this.offset -= head.pcm.length;
          this.queue.shift();
          continue;
        }
        const frac = this.offset - pos;
        const a = head.pcm[pos];
        const b = pos + 1 < head.pcm.length ? head.pcm[pos + 1] : a;
        sample = a + (b - a) * frac;
        this.offset += this.rate;
        this.played += this.rate;
        if (!this.playing) {
          this.playing = true;
          this.port.postMessage({ playing: true });
        }
        break;
      }
      if (!this.queue.length && this.playing) {
        this.playing = false;
        this.port.postMessage({ playing: false, played: this.played });
      }
      out[i] = sample;
      this.outSq += sample * sample;
    }
  }

  process(inputs, outputs) {
    const input = inputs[0] && inputs[0][0];
    const output = outputs[0];
    const frames = output[0].length;
    if (input) this.capture(input);
    else if (this.capturing) this.capture(new Float32Array(frames)); // a muted mic is silence
    this.playback(output[0]);
    for (let c = 1; c < output.length; c++) output[c].set(output[0]);
    this.meterCount += frames;
    if (this.meterCount >= this.meterEvery) {
      this.port.postMessage({
        levels: {
          mic: Math.sqrt(this.micSq / this.meterCount),
          agent: Math.sqrt(this.outSq / this.meterCount),
        },
        played: this.played,
      });
      this.meterCount = 0;
      this.micSq = 0;
      this.outSq = 0;
    }
    return true;
  }
}

registerProcessor("phone-io", PhoneIO);
