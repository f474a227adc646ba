import { request } from 'node:http';
import { CladeError } from '../util/errors.js';
import { Sandbox } from '../sdk/sandbox.js';
import { saveBenchResult, summarize, type Summary } from './stats.js';

// What a network costs a sandbox: the same work with and without one, in one
// run. Two warm parents (one with a network and a forwarded port, one
// without) are forked in turn, one child at a time, and each clock stops when
// the child's answer to a command reaches the host; with a network, also when
// the guest server the child inherited answers on the child's own host port.

const GUEST_PORT = 8000;
const SERVER = `mkdir -p /root/www && echo warm > /root/www/who && cd /root/www && (python3 -m http.server ${GUEST_PORT} > /dev/null 2>&1 &)`;

export type NetworkBenchResult = {
  benchmark: 'network';
  date: string;
  engine: string;
  accelerator: string;
  runs: number;
  metrics: Record<string, Summary>;
  raw: Record<string, number[]>;
  jsonPath?: string;
};

function httpGet(hostPort: string, path: string): Promise<string> {
  const [host, port] = hostPort.split(':');
  return new Promise((resolve, reject) => {
    const req = request({ host, port: Number(port), path, timeout: 10_000 }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve(body));
    });
    req.on('timeout', () => req.destroy(new Error(`no answer from ${hostPort} within 10 s`)));
    req.on('error', reject);
    req.end();
  });
}

/** Polls the forwarded port until the guest server answers (a fresh server needs a moment). */
async function firstAnswer(hostPort: string, deadlineMs = 30_000): Promise<void> {
  const until = Date.now() + deadlineMs;
  for (;;) {
    try {
      if ((await httpGet(hostPort, '/who')).trim() === 'warm') return;
    } catch (err) {
      if (Date.now() > until) throw new CladeError('timeout', `the guest server never answered on ${hostPort}: ${(err as Error).message}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function forkOne(parent: Sandbox): Promise<Sandbox> {
  const [kid] = await parent.fork(1);
  if (!kid || kid instanceof CladeError) throw kid ?? new CladeError('internal', 'the fork made no child');
  return kid;
}

async function timeCreate(network: boolean): Promise<{ sb: Sandbox; ms: number }> {
  const t0 = performance.now();
  const sb = await Sandbox.create(network ? { network: { egress: 'none', ports: [GUEST_PORT] } } : {});
  await sb.commands.run('true');
  return { sb, ms: performance.now() - t0 };
}

/** Forks with and without a network, interleaved, `runs` times each. */
export async function benchNetwork(opts: { runs: number; log?: (line: string) => void }): Promise<NetworkBenchResult> {
  const raw: Record<string, number[]> = { createPlainMs: [], createNetworkMs: [], forkPlainToResultMs: [], forkNetworkToResultMs: [], forkNetworkToPortAnswerMs: [] };
  const parents: Sandbox[] = [];
  try {
    const plain = await timeCreate(false);
    parents.push(plain.sb);
    raw.createPlainMs!.push(plain.ms);
    const net = await timeCreate(true);
    parents.push(net.sb);
    raw.createNetworkMs!.push(net.ms);
    for (const p of parents) await p.commands.run(SERVER);
    await firstAnswer(net.sb.getHost(GUEST_PORT));
    for (let i = 0; i < opts.runs; i++) {
      for (const [parent, key] of [[plain.sb, 'forkPlainToResultMs'], [net.sb, 'forkNetworkToResultMs']] as const) {
        const t0 = performance.now();
        const kid = await forkOne(parent);
        try {
          const r = await kid.commands.run('echo ok');
          if (r.stdout.trim() !== 'ok') throw new CladeError('internal', `child answered ${JSON.stringify(r.stdout)}`);
          raw[key]!.push(performance.now() - t0);
          if (parent === net.sb) {
            await firstAnswer(kid.getHost(GUEST_PORT));
            raw.forkNetworkToPortAnswerMs!.push(performance.now() - t0);
          }
        } finally {
          await kid.kill();
        }
      }
      opts.log?.(`run ${i + 1}/${opts.runs}: fork -> result ${raw.forkPlainToResultMs!.at(-1)!.toFixed(0)} ms without a network, ${raw.forkNetworkToResultMs!.at(-1)!.toFixed(0)} ms with one`);
    }
    const info = net.sb.getInfo();
    return saveBenchResult<NetworkBenchResult>({
      benchmark: 'network',
      date: new Date().toISOString(),
      engine: info.engine,
      accelerator: info.accelerator,
      runs: opts.runs,
      metrics: Object.fromEntries(Object.entries(raw).map(([k, v]) => [k, summarize(v)])),
      raw,
    });
  } finally {
    await Promise.all(parents.map((p) => p.kill()));
  }
}
