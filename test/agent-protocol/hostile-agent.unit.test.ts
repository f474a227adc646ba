import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { AgentClient } from '../../src/agent-protocol/client.js';
import { MAX_PAYLOAD, MessageType, Tag } from '../../src/agent-protocol/constants.js';
import { FieldWriter } from '../../src/agent-protocol/fields.js';
import { encodeHeader } from '../../src/agent-protocol/frame.js';
import { MAX_CAPTURE_BYTES } from '../../src/core/capture.js';
import { runCommand, type CommandResult } from '../../src/core/commands.js';
import { agentFileOps, Files } from '../../src/core/files.js';
import { connectFake, FakeAgent, fakeLiveSandbox, rssMiB, type HostRequest } from '../helpers/fake-agent.js';

// A guest that breaks the protocol on purpose: the host must fail the one
// request concerned, with a clear error, keep serving, and stay within bounded
// memory. No VM: the agent is played by the test on a unix socket.

let agent: FakeAgent;
let client: AgentClient;

beforeEach(async () => {
  agent = new FakeAgent();
  await agent.start();
  client = await connectFake(agent, { requestMs: 600, writeStallMs: 600, readIdleMs: 600, exitGraceMs: 200 });
});

afterEach(async () => {
  client.close();
  await agent.stop();
});

const u64 = (tag: number, v: number) => new FieldWriter().u64(tag as never, v);
/** A field whose value has the wrong size for a u64. */
const badU64 = (tag: number) => new FieldWriter().bytes(tag as never, Buffer.alloc(3));

/** The agent answers STAT correctly, so "the channel still works" can be checked after each attack. */
function answerStat(req: HostRequest): boolean {
  if (req.type !== MessageType.STAT) return false;
  agent.ok(req.id, new FieldWriter().str(Tag.NAME, 'f').u64(Tag.TYPE, 1).u64(Tag.SIZE, 1).u64(Tag.MODE, 0o644).u64(Tag.MTIME_MS, 0));
  return true;
}

async function stillServes(): Promise<void> {
  await expect(client.stat('/f')).resolves.toMatchObject({ name: 'f', type: 'file' });
}

describe('a hostile agent', () => {
  it('fails only the request whose reply is malformed: exec start, exec exit, list, error', async () => {
    let execs = 0;
    agent.onRequest = (req) => {
      if (answerStat(req)) return;
      if (req.type === MessageType.EXEC && execs++ === 0) agent.send(MessageType.OK, req.id, badU64(Tag.PID).toBuffer());
      else if (req.type === MessageType.EXEC) {
        agent.ok(req.id, u64(Tag.PID, 42));
        agent.send(MessageType.EXIT, req.id, Buffer.from([1, 2, 3])); // not a field list
      } else if (req.type === MessageType.LIST) agent.ok(req.id, new FieldWriter().bytes(Tag.ENTRY, Buffer.from([9, 9, 9, 9, 9, 9, 9])));
      else if (req.type === MessageType.MKDIR) agent.send(MessageType.ERROR, req.id, Buffer.from([0xff, 0xff]));
    };
    await expect(client.exec({ shell: 'x' })).rejects.toMatchObject({ code: 'protocol_error', message: expect.stringMatching(/malformed reply/) });
    const second = await client.exec({ shell: 'y' });
    expect(second.pid).toBe(42);
    await expect(second.exited).rejects.toMatchObject({ code: 'protocol_error' });
    await expect(client.list('/')).rejects.toMatchObject({ code: 'protocol_error' });
    await expect(client.mkdir('/d')).rejects.toMatchObject({ code: 'protocol_error', message: expect.stringMatching(/malformed error reply/) });
    await stillServes();
    expect(client.violationCount).toBeGreaterThanOrEqual(2);
  });

  it('keeps at most 32 protocol violations however many come', async () => {
    agent.onRequest = (req) => void answerStat(req);
    // Each run of junk between frames is one violation.
    for (let i = 0; i < 2000; i++) agent.sendRaw(Buffer.concat([Buffer.from('junk'), encodeHeader(MessageType.STDOUT, 99999, 0)]));
    await agent.drained();
    await stillServes();
    expect(client.violationCount).toBeGreaterThanOrEqual(2000);
    expect(client.violations.length).toBeLessThanOrEqual(32);
  });

  it('times out a reply that never ends', async () => {
    agent.onRequest = (req) => {
      if (req.type === MessageType.STAT) agent.sendRaw(Buffer.concat([encodeHeader(MessageType.OK, req.id, MAX_PAYLOAD), Buffer.alloc(10)]));
    };
    const t0 = Date.now();
    await expect(client.stat('/never')).rejects.toMatchObject({ code: 'timeout' });
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('gives up on a guest that never reads what the host writes', async () => {
    agent.onRequest = (req) => {
      if (req.type === MessageType.WRITE_OPEN) {
        agent.ok(req.id);
        agent.conn!.pause(); // and never reads again
      }
    };
    const t0 = Date.now();
    await expect(client.writeFile('/big', Buffer.alloc(64 * 1024 * 1024))).rejects.toMatchObject({ code: 'timeout', message: expect.stringMatching(/took no input/) });
    expect(Date.now() - t0).toBeLessThan(10_000);
  });

  it('kills a command itself when the guest never reports its end', async () => {
    const signals: number[] = [];
    agent.onRequest = (req) => {
      if (req.type === MessageType.EXEC) agent.ok(req.id, u64(Tag.PID, 7));
      if (req.type === MessageType.SIGNAL) {
        signals.push(req.id);
        agent.ok(req.id);
      }
    };
    const handle = await client.exec({ shell: 'sleep forever', timeoutMs: 200 });
    await expect(handle.exited).rejects.toMatchObject({ code: 'timeout', message: expect.stringMatching(/SIGKILL/) });
    expect(signals).toHaveLength(1);
  });

  it('reassembles a 1 MiB frame sent a byte at a time in linear time', async () => {
    let done!: () => void;
    const got = new Promise<void>((r) => (done = r));
    let bytes = 0;
    agent.onRequest = (req) => {
      if (req.type !== MessageType.EXEC) return;
      agent.ok(req.id, u64(Tag.PID, 1));
      const frame = Buffer.concat([encodeHeader(MessageType.STDOUT, req.id, MAX_PAYLOAD), Buffer.alloc(MAX_PAYLOAD, 0x61)]);
      // 1 MiB in 16-byte writes: the host sees tens of thousands of small chunks.
      void (async () => {
        for (let off = 0; off < frame.length; off += 16) if (!agent.sendRaw(frame.subarray(off, off + 16))) await agent.drained();
      })();
    };
    const t0 = Date.now();
    await client.exec({ shell: 'x' }, { onStdout: (d) => ((bytes += d.length), bytes === MAX_PAYLOAD && done()) });
    await got;
    const ms = Date.now() - t0;
    console.log(`1 MiB frame in 16-byte pieces reassembled in ${ms} ms`);
    expect(ms).toBeLessThan(20_000);
  });

  it('holds a command result to its cap while the guest floods output, in bounded memory', async () => {
    const total = 256 * 1024 * 1024;
    agent.onRequest = (req) => {
      if (req.type !== MessageType.EXEC) return;
      agent.ok(req.id, u64(Tag.PID, 1));
      void (async () => {
        const chunk = Buffer.alloc(64 * 1024, 0x62);
        for (let sent = 0; sent < total; sent += chunk.length) if (!agent.send(MessageType.STDOUT, req.id, chunk)) await agent.drained();
        // Then a byte at a time: many tiny frames must not cost a buffer each.
        for (let i = 0; i < 50_000; i++) if (!agent.send(MessageType.STDERR, req.id, Buffer.from('z'))) await agent.drained();
        agent.send(MessageType.EXIT, req.id, u64(Tag.EXIT_CODE, 0).toBuffer());
      })();
    };
    const live = fakeLiveSandbox(client);
    const before = rssMiB();
    let seen = 0;
    const r = (await runCommand(live, 'flood', { onStdout: (d) => (seen += d.length), timeoutMs: 0 })) as CommandResult;
    const grew = rssMiB() - before;
    console.log(`guest sent 256 MiB + 50000 one-byte frames; host RSS grew ${grew} MiB (bound 200 MiB); result kept ${r.stdout.length} bytes, dropped ${r.truncated?.stdout}`);
    expect(seen).toBe(total);
    expect(r.stdout.length).toBe(MAX_CAPTURE_BYTES);
    expect(r.truncated).toEqual({ stdout: total - MAX_CAPTURE_BYTES, stderr: 0 });
    expect(r.stderr.length).toBe(50_000);
    expect(grew).toBeLessThan(200);
    await live.kill();
  });

  it('refuses a file read past its cap with a clear error, and streams instead', async () => {
    const size = 8 * 1024 * 1024;
    agent.onRequest = (req) => {
      if (answerStat(req)) return;
      if (req.type !== MessageType.READ_FILE) return;
      // This agent ignores LIMIT, as an old or hostile one would: the host cuts it off itself.
      void (async () => {
        const chunk = Buffer.alloc(256 * 1024, 0x63);
        for (let sent = 0; sent < size; sent += chunk.length) if (!agent.send(MessageType.FILE_DATA, req.id, chunk)) await agent.drained();
        agent.ok(req.id, u64(Tag.SIZE, size));
      })();
    };
    const live = fakeLiveSandbox(client);
    const sb = { files: new Files(agentFileOps(live.agent)) };
    await expect(sb.files.read('/big', { maxBytes: 1024 * 1024 })).rejects.toMatchObject({ code: 'too_large', message: expect.stringMatching(/format: 'stream'/) });
    const stream = await sb.files.read('/big', { format: 'stream' });
    let n = 0;
    for await (const c of stream as unknown as AsyncIterable<Uint8Array>) n += c.length;
    expect(n).toBe(size);
    await live.kill();
  });
});
