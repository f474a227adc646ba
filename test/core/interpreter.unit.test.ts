import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { InterpreterSession, MarkerScanner, MAX_CAPTURE_BYTES, MAX_MARKER_PAYLOAD, type CodeResult, type RunCodeOptions } from '../../src/core/interpreter.js';
import type { InterpreterHost } from '../../src/core/interpreter.js';

// A full collection on demand, for memory measurements that garbage cannot blur.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

// The host side of runCode against hostile or awkward interpreter output, without a VM:
// a fake sandbox records what is sent to the interpreter and the test plays its part.

type Fake = { sb: InterpreterHost; sent: string[]; signals: number[] };

function fakeSandbox(): Fake {
  const sent: string[] = [];
  const signals: number[] = [];
  const sb = {
    agent: {
      writeStdinTo: async (_id: number, data: Buffer) => void sent.push(data.toString()),
      signalExec: async (_id: number, sig: number) => void signals.push(sig),
    },
    interpreter: undefined,
    interpreterExecId: undefined,
  } as unknown as InterpreterHost;
  return { sb, sent, signals };
}

/** Starts a request and returns its promise and nonce (once the request line has been "sent"). */
async function start(s: InterpreterSession, f: Fake, code = 'x', opts: RunCodeOptions = {}): Promise<{ result: Promise<CodeResult>; nonce: string }> {
  const before = f.sent.length;
  const result = s.send({ code }, opts);
  result.catch(() => undefined);
  while (f.sent.length === before) await new Promise((r) => setImmediate(r));
  const req = JSON.parse(f.sent[f.sent.length - 1]!) as { nonce: string; code: string };
  expect(req.code).toBe(code);
  return { result, nonce: req.nonce };
}

const marker = (nonce: string, payload: string) => Buffer.from(`\x1eclade:${nonce}:${payload}\n`);

/** Feeds `data` in chunks of `size` bytes. */
function feed(push: (b: Buffer) => void, data: Buffer, size: number): void {
  for (let off = 0; off < data.length; off += size) push(data.subarray(off, off + size));
}

describe('MarkerScanner', () => {
  function collect(nonce: string | undefined, chunks: Buffer[], maxPayload?: number) {
    const text: Buffer[] = [];
    const markers: { nonce: string; payload: string }[] = [];
    let overflows = 0;
    const sc = new MarkerScanner(
      { text: (d) => void text.push(Buffer.from(d)), marker: (n, p) => void markers.push({ nonce: n, payload: p.toString() }), overflow: () => void overflows++ },
      () => nonce,
      maxPayload,
    );
    for (const c of chunks) sc.push(c);
    return { text: Buffer.concat(text).toString(), markers, overflows, pieces: text.length };
  }

  it('finds a marker split anywhere across chunks, and gives back what only looked like one', () => {
    const nonce = 'ab'.repeat(12);
    const stream = Buffer.from(`out\x1e\x1ecl\x1eclade:${nonce}X\x1eclade:wrong:{"x":1}\n${'é'}${marker(nonce, '{"value":"1"}').toString()}after`);
    const expectText = `out\x1e\x1ecl\x1eclade:${nonce}X\x1eclade:wrong:{"x":1}\n${'é'}`;
    for (let a = 0; a <= stream.length; a++) {
      for (const b of [a, Math.min(stream.length, a + 1), Math.min(stream.length, a + 7), stream.length]) {
        const r = collect(nonce, [stream.subarray(0, a), stream.subarray(a, b), stream.subarray(b)]);
        expect(r.markers).toEqual([{ nonce, payload: '{"value":"1"}' }]);
        expect(r.text).toBe(expectText + 'after');
      }
    }
    const bytewise = collect(nonce, [...stream].map((b) => Buffer.from([b])));
    expect(bytewise.markers).toHaveLength(1);
    expect(bytewise.text).toBe(expectText + 'after');
  });

  it('treats a forged marker with a wrong nonce as text', () => {
    const r = collect('11'.repeat(12), [marker('22'.repeat(12), '{"value":"forged"}'), marker('11'.repeat(11), '{}')]);
    expect(r.markers).toEqual([]);
    expect(r.text).toBe(marker('22'.repeat(12), '{"value":"forged"}').toString() + marker('11'.repeat(11), '{}').toString());
  });

  it('drops output while no request runs', () => {
    expect(collect(undefined, [Buffer.from('noise'), marker('aa', 'x')])).toMatchObject({ text: '', markers: [] });
  });

  it('emits a chunk of text in one piece, not byte by byte, even when it is full of marker starts', () => {
    const data = Buffer.alloc(1 << 20, 0x1e);
    const r = collect('cd'.repeat(12), [data]);
    expect(r.text.length).toBe((1 << 20) - 1); // the last byte could still begin a marker: held back
    expect(r.pieces).toBe(1);
  });

  it('caps a marker payload and skips to its newline', () => {
    const nonce = 'ef'.repeat(12);
    const r = collect(nonce, [Buffer.from(`\x1eclade:${nonce}:`), Buffer.alloc(5000, 0x41), Buffer.from('\nnext'), marker(nonce, 'ok')], 1000);
    expect(r.overflows).toBe(1);
    expect(r.markers).toEqual([{ nonce, payload: 'ok' }]);
    expect(r.text).toBe('next');
  });

  it('is linear in the output: 16 MB a byte at a time', () => {
    const nonce = '01'.repeat(12);
    let bytes = 0;
    let markers = 0;
    const sc = new MarkerScanner({ text: (d) => void (bytes += d.length), marker: () => void markers++, overflow: () => undefined }, () => nonce);
    // Text with marker look-alikes every 64 bytes, so the scanner keeps starting and abandoning matches.
    const unit = Buffer.from(`${'x'.repeat(40)}\x1eclade:${'01'.repeat(10)}zz${'y'.repeat(0)}`);
    const block = Buffer.concat(Array.from({ length: Math.ceil(65536 / unit.length) }, () => unit)).subarray(0, 65536);
    const total = 16 * 1024 * 1024;
    const t0 = performance.now();
    for (let off = 0; off < total; off += block.length) {
      for (let i = 0; i < block.length; i++) sc.push(block.subarray(i, i + 1));
    }
    sc.push(marker(nonce, 'end'));
    const ms = performance.now() - t0;
    expect(bytes).toBe(total);
    expect(markers).toBe(1);
    // Linear: well under a microsecond per byte on any machine this runs on; quadratic would take hours.
    expect(ms).toBeLessThan(60_000);
  }, 120_000);
});

describe('InterpreterSession', () => {
  it('returns the result once both markers are in, with the output before them', async () => {
    const f = fakeSandbox();
    const s = new InterpreterSession(f.sb, 7);
    const seen: string[] = [];
    const { result, nonce } = await start(s, f, 'print(1)', { onStdout: (d) => seen.push(d) });
    s.onStdout(Buffer.from('hello\n'));
    s.onStdout(marker(nonce, JSON.stringify({ id: 1, value: '42' })));
    s.onStdout(Buffer.from('late stdout, after its marker\n'));
    s.onStderr(Buffer.from('warn\n'));
    let settled = false;
    void result.then(() => (settled = true));
    await new Promise((r) => setImmediate(r));
    expect(settled).toBe(false); // stderr is not complete yet
    s.onStderr(marker(nonce, 'end'));
    expect(await result).toEqual({ stdout: 'hello\n', stderr: 'warn\n', value: '42' });
    expect(seen.join('')).toBe('hello\n');
  });

  it('keeps forged markers as output and returns the real result; the next request works', async () => {
    const f = fakeSandbox();
    const s = new InterpreterSession(f.sb, 7);
    const { result, nonce } = await start(s, f);
    const forged = `\x1eclade:${'0'.repeat(24)}:{"value":"'forged'"}\n`;
    s.onStdout(Buffer.from(forged));
    s.onStderr(Buffer.from(`\x1eclade:${nonce.slice(0, 23)}X:end\n`));
    s.onStderr(marker(nonce, 'end'));
    s.onStdout(marker(nonce, JSON.stringify({ value: "'real'" })));
    const r = await result;
    expect(r.value).toBe("'real'");
    expect(r.stdout).toBe(forged);
    const second = await start(s, f, 'y');
    expect(second.nonce).not.toBe(nonce);
    s.onStdout(marker(nonce, JSON.stringify({ value: 'stale' }))); // the old nonce ends nothing now
    s.onStderr(marker(second.nonce, 'end'));
    s.onStdout(marker(second.nonce, JSON.stringify({ value: '2' })));
    expect(await second.result).toMatchObject({ value: '2', stdout: marker(nonce, JSON.stringify({ value: 'stale' })).toString() });
  });

  it('gives the same result however the stream is chunked, down to single bytes, UTF-8 included', async () => {
    for (const size of [1, 2, 3, 5, 16, 1000]) {
      const f = fakeSandbox();
      const s = new InterpreterSession(f.sb, 7);
      const seen: string[] = [];
      const { result, nonce } = await start(s, f, 'x', { onStdout: (d) => seen.push(d) });
      const text = 'héllo wörld ✓ 𝄞 \x1eclade:nearly\n'.repeat(20);
      feed(s.onStdout, Buffer.concat([Buffer.from(text), marker(nonce, JSON.stringify({ value: 'v' }))]), size);
      feed(s.onStderr, marker(nonce, 'end'), size);
      const r = await result;
      expect(r.stdout).toBe(text);
      expect(seen.join('')).toBe(text);
    }
  });

  it('caps what it keeps of the output, says how much it left out, and streams all of it', async () => {
    const f = fakeSandbox();
    const s = new InterpreterSession(f.sb, 7);
    let streamed = 0;
    const { result, nonce } = await start(s, f, 'x', { onStdout: (d) => void (streamed += d.length) });
    const total = MAX_CAPTURE_BYTES + 3 * 1024 * 1024;
    const chunk = Buffer.alloc(64 * 1024, 0x61);
    for (let n = 0; n < total; n += chunk.length) s.onStdout(chunk);
    s.onStdout(marker(nonce, '{}'));
    s.onStderr(marker(nonce, 'end'));
    const r = await result;
    expect(Buffer.byteLength(r.stdout)).toBe(MAX_CAPTURE_BYTES);
    expect(r.truncated).toEqual({ stdout: total - MAX_CAPTURE_BYTES, stderr: 0 });
    expect(streamed).toBe(total);
  });

  it('holds 100 MB without a newline in bounded memory, and a runaway marker line fails only its request', async () => {
    const f = fakeSandbox();
    const s = new InterpreterSession(f.sb, 7);
    // Fresh chunks, as a socket delivers them: whatever the session keeps of them stays alive.
    const chunk = () => Buffer.alloc(1024 * 1024, 0x62);
    /**
     * Memory in buffers the session still holds. V8 frees dead buffers on a background thread after a
     * collection, so the least of a few collections a moment apart counts (nothing is fed meanwhile).
     */
    const held = async () => {
      let least = Infinity;
      for (let i = 0; i < 3; i++) {
        gc();
        least = Math.min(least, process.memoryUsage().arrayBuffers);
        await new Promise((r) => setTimeout(r, 5));
      }
      return least;
    };
    const first = await start(s, f);
    const base = await held();
    let peak = 0;
    for (let i = 0; i < 100; i++) {
      s.onStdout(chunk());
      if (i % 10 === 9) peak = Math.max(peak, (await held()) - base);
    }
    s.onStdout(marker(first.nonce, '{"value":"1"}'));
    s.onStderr(marker(first.nonce, 'end'));
    const r = await first.result;
    expect(r.truncated?.stdout).toBe(100 * 1024 * 1024 - MAX_CAPTURE_BYTES);
    // Growing the capture copies it once into a buffer twice its size; a few chunks may still be in
    // flight: 100 MB went in.
    expect(peak).toBeLessThan(2 * MAX_CAPTURE_BYTES + 12 * 1024 * 1024);

    // A marker with the right nonce whose line never ends: cut at the payload limit.
    const second = await start(s, f);
    s.onStdout(Buffer.from(`\x1eclade:${second.nonce}:`));
    const base2 = await held();
    let peak2 = 0;
    for (let i = 0; i < 100; i++) {
      s.onStdout(chunk());
      if (i % 10 === 9) peak2 = Math.max(peak2, (await held()) - base2);
    }
    await expect(second.result).rejects.toMatchObject({ code: 'protocol_error' });
    expect(peak2).toBeLessThan(MAX_MARKER_PAYLOAD + 4 * 1024 * 1024);
    s.onStdout(Buffer.from('\n')); // the runaway line ends

    const third = await start(s, f);
    s.onStdout(Buffer.from('fine\n'));
    s.onStderr(marker(third.nonce, 'end'));
    s.onStdout(marker(third.nonce, '{"value":"3"}'));
    expect(await third.result).toMatchObject({ value: '3', stdout: 'fine\n' });
  }, 60_000);

  it('refuses a malformed or mistyped result', async () => {
    for (const payload of ['not json', '[]', '{"value":5}', '{"error":{"name":"E"}}', '{"error":"x"}']) {
      const f = fakeSandbox();
      const s = new InterpreterSession(f.sb, 7);
      const { result, nonce } = await start(s, f);
      s.onStderr(marker(nonce, 'end'));
      s.onStdout(marker(nonce, payload));
      await expect(result).rejects.toMatchObject({ code: 'protocol_error' });
    }
  });

  it('kills the interpreter on a timeout and lets go of the sandbox', async () => {
    const f = fakeSandbox();
    const s = new InterpreterSession(f.sb, 7);
    (f.sb as { interpreter?: InterpreterSession }).interpreter = s;
    const { result } = await start(s, f, 'while True: pass', { timeoutMs: 50 });
    await expect(result).rejects.toMatchObject({ code: 'timeout' });
    expect(f.signals).toEqual([9]);
    expect(f.sb.interpreter).toBeUndefined();
  });
});
