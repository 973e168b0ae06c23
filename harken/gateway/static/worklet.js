// Microphone capture on the audio thread: mono, resampled to the target rate, posted to the
// page in fixed-size Float32 chunks (100 ms at 16 kHz = 1600 samples).
//
// Resampling happens here because not every browser can open an AudioContext at 16 kHz and
// connect a microphone to it (Firefox refuses different rates). When the context already runs
// at the target rate the samples pass through untouched.

class StreamingResampler {
  // Windowed-sinc low-pass (below the target Nyquist, so nothing aliases into speech) followed
  // by linear interpolation at the output positions. State carries across blocks.
  constructor(inRate, outRate) {
    this.step = inRate / outRate;                    // input samples per output sample
    const cutoff = (0.45 * outRate) / inRate;       // 7.2 kHz for 16 kHz out, in cycles per input sample
    // 16 taps per output sample each side: a ~2.7 kHz transition band (48 kHz in), so speech up
    // to ~6 kHz passes and little above 8 kHz folds back. Upsampling cannot alias: no filter.
    const half = this.step > 1 ? Math.ceil(16 * this.step) : 0;
    const taps = new Float32Array(2 * half + 1);
    let sum = 0;
    for (let i = -half; i <= half; i++) {
      const sinc = i === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * i) / (Math.PI * i);
      const blackman = half === 0 ? 1 : 0.42 + 0.5 * Math.cos((Math.PI * i) / half) + 0.08 * Math.cos((2 * Math.PI * i) / half);
      taps[i + half] = sinc * blackman;
      sum += taps[i + half];
    }
    for (let i = 0; i < taps.length; i++) taps[i] /= sum;   // unity gain at DC
    this.taps = taps;
    this.history = new Float32Array(taps.length);          // circular, newest at this.head
    this.head = 0;
    this.previous = 0;     // filtered value of the previous input sample
    this.position = 1;     // next output position, in input samples after `previous`
  }

  // Calls emit(sample) for every output sample that `input` completes.
  push(input, emit) {
    const { taps, history } = this;
    const n = taps.length;
    for (let k = 0; k < input.length; k++) {
      this.head = (this.head + 1) % n;
      history[this.head] = input[k];
      let filtered = 0;
      for (let i = 0, j = this.head; i < n; i++, j = j === 0 ? n - 1 : j - 1) filtered += taps[i] * history[j];
      while (this.position <= 1) {
        emit(this.previous + (filtered - this.previous) * this.position);
        this.position += this.step;
      }
      this.position -= 1;
      this.previous = filtered;
    }
  }
}

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, chunkSamples = 1600 } = options.processorOptions || {};
    this.resampler = sampleRate === targetRate ? null : new StreamingResampler(sampleRate, targetRate);
    this.chunkSamples = chunkSamples;
    this.chunk = new Float32Array(chunkSamples);
    this.filled = 0;
    this.running = true;
    this.emit = (sample) => {
      this.chunk[this.filled++] = sample;
      if (this.filled === this.chunkSamples) this.post();
    };
    this.port.onmessage = (event) => {
      if (event.data === "stop") {       // hand over the partial last chunk, then end
        this.post();
        this.running = false;
      }
    };
  }

  post() {
    if (this.filled === 0) return;
    const chunk = this.filled === this.chunkSamples ? this.chunk : this.chunk.slice(0, this.filled);
    this.port.postMessage(chunk, [chunk.buffer]);
    this.chunk = new Float32Array(this.chunkSamples);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!this.running) return false;
    if (!channels || channels.length === 0) return true;    // not connected yet
    let mono = channels[0];
    if (channels.length > 1) {                               // mix down, as the gateway would
      mono = new Float32Array(mono.length);
      for (const channel of channels) for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / channels.length;
    }
    if (this.resampler) this.resampler.push(mono, this.emit);
    else for (let i = 0; i < mono.length; i++) this.emit(mono[i]);
    return true;
  }
}

registerProcessor("pcm-capture", PcmCaptureProcessor);
