import { spawn, spawnSync, type SpawnOptions } from 'node:child_process';

/** `output` is stdout and stderr together, in the order they arrived. */
export type RunResult = { status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; output: string };

/**
 * Runs a program to its end without blocking the test's event loop. Tests must
 * not use spawnSync for anything slow: a worker blocked for a minute misses
 * vitest's own RPC deadline and the whole run fails with "Timeout calling
 * onTaskUpdate" even though every test passed.
 */
export function run(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const spawnOpts: SpawnOptions = { stdio: ['ignore', 'pipe', 'pipe'], ...(opts.cwd ? { cwd: opts.cwd } : {}), ...(opts.env ? { env: opts.env } : {}), ...(opts.timeoutMs ? { timeout: opts.timeoutMs } : {}) };
    const child = spawn(cmd, args, spawnOpts);
    let stdout = '';
    let stderr = '';
    let output = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => ((stdout += d), (output += d)));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => ((stderr += d), (output += d)));
    child.on('error', reject);
    child.on('close', (status, signal) => resolve({ status, signal, stdout, stderr, output }));
  });
}

/** Builds a native component (make -s -C dir) and fails the test with make's output if it does not build. */
export async function make(dir: string): Promise<void> {
  const r = await run('make', ['-s', '-C', dir]);
  if (r.status !== 0) throw new Error(`make -C ${dir} failed:\n${r.stdout}${r.stderr}`);
}

/** True where clang can build libFuzzer targets (the fuzzing runs are skipped elsewhere). */
export function hasLibFuzzer(): boolean {
  if (spawnSync('clang', ['--version']).status !== 0) return false;
  const probe = spawnSync('bash', ['-c', 'echo "int LLVMFuzzerTestOneInput(const char *d, long n){(void)d;(void)n;return 0;}" | clang -x c -fsanitize=fuzzer -o /dev/null -']);
  return probe.status === 0;
}
