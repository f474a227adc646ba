import { existsSync } from 'node:fs';
import { asCladeError, CladeError } from '../util/errors.js';
import { noProgress, type ProgressFn } from '../util/progress.js';
import { runCommand, type CommandHandle, type CommandResult } from './commands.js';
import { runCode } from './interpreter.js';
import type { SandboxManager } from './manager.js';
import type { LiveSandbox } from './sandbox.js';
import { assertTagFree, removeSnapshot, validateTag } from './snapshots.js';
import { checkTemplateSpec, templateFile, type TemplateInfo, type TemplateSpec, writeTemplate } from './template-store.js';

// A template is a snapshot taken after setup: boot an image, run setup
// commands and Python code, optionally start a long-running process and wait
// until a ready command succeeds, then snapshot. Sandboxes created from it
// start from that memory (already warm, the process already serving), not
// from a boot.

const READY_POLL_MS = 250;
const DEFAULT_READY_TIMEOUT_MS = 120_000;
const START_LOG = '/var/log/clade-start.log';

/**
 * Boots, sets up, starts, waits for ready, snapshots, and kills the setup
 * sandbox. Setup output streams to `progress` as it comes. On any failure the
 * sandbox is killed and nothing is left: no snapshot, no record.
 */
export async function createTemplate(manager: SandboxManager, raw: unknown, progress: ProgressFn = noProgress): Promise<TemplateInfo> {
  const spec = checkTemplateSpec(raw);
  validateTag(spec.name);
  assertTagFree(spec.name);
  if (existsSync(templateFile(spec.name))) throw new CladeError('conflict', `template ${spec.name} exists; remove it first with \`clade template rm ${spec.name}\``);
  const started = Date.now();
  progress({ phase: 'boot', message: `booting image ${spec.image ?? 'default'}` });
  const sb = await manager.create({ ...(spec.image ? { image: spec.image } : {}), ...(spec.memoryMiB ? { memoryMiB: spec.memoryMiB } : {}), ...(spec.engine ? { engine: spec.engine } : {}), ...(spec.env ? { env: spec.env } : {}), ...(spec.network ? { network: spec.network } : {}) });
  let snapshotted = false;
  try {
    await runSetup(sb, spec, progress);
    progress({ phase: 'snapshot', message: `saving snapshot ${spec.name}` });
    const { meta } = await manager.snapshot(sb, spec.name);
    snapshotted = true;
    const info: TemplateInfo = { ...spec, snapshot: spec.name, imageDigest: meta.image, engineUsed: meta.engine, createdAt: meta.createdAt, setupSeconds: (Date.now() - started) / 1000 };
    writeTemplate(info);
    return info;
  } catch (err) {
    if (snapshotted) removeSnapshot(spec.name, { cascade: false });
    throw asCladeError(err, `template ${spec.name} was not created`);
  } finally {
    await sb.kill();
  }
}

async function runSetup(sb: LiveSandbox, spec: TemplateSpec, progress: ProgressFn): Promise<void> {
  const timeoutMs = spec.stepTimeoutMs ?? 0;
  const stream = (phase: string) => (data: string) => {
    for (const line of data.split('\n')) if (line.length > 0) progress({ phase, message: line });
  };
  const runs = spec.run ?? [];
  for (const [i, cmd] of runs.entries()) {
    progress({ phase: 'run', message: `[${i + 1}/${runs.length}] ${cmd}` });
    const r = (await runCommand(sb, cmd, { timeoutMs, onStdout: stream('run'), onStderr: stream('run') })) as CommandResult;
    if (r.exitCode !== 0) throw new CladeError('bad_request', `setup command ${i + 1} exited with code ${r.exitCode}${r.timedOut ? ' (timed out)' : ''}: ${cmd}\n${r.stderr.slice(-2000)}`);
  }
  const codes = spec.code ?? [];
  for (const [i, code] of codes.entries()) {
    progress({ phase: 'code', message: `[${i + 1}/${codes.length}] ${code.split('\n')[0]}` });
    const r = await runCode(sb, code, { timeoutMs, onStdout: stream('code'), onStderr: stream('code') });
    if (r.error) throw new CladeError('bad_request', `setup code ${i + 1} raised ${r.error.name}: ${r.error.value}\n${r.error.traceback.slice(-2000)}`);
  }
  if (!spec.start) return;
  progress({ phase: 'start', message: spec.start });
  // Output goes to a file in the guest: the command outlives this connection, and the template's sandboxes read it there.
  const handle = (await runCommand(sb, ['/bin/sh', '-c', `{\n${spec.start}\n} >>${START_LOG} 2>&1`], { background: true, timeoutMs: 0, captureOutput: false })) as CommandHandle;
  if (spec.ready) await waitReady(sb, spec, handle, progress);
}

/** Polls the ready command until it exits 0; fails early when the start command ends. */
async function waitReady(sb: LiveSandbox, spec: TemplateSpec, handle: CommandHandle, progress: ProgressFn): Promise<void> {
  let ended: CommandResult | undefined;
  void handle.wait().then((r) => (ended = r), () => undefined);
  const deadline = Date.now() + (spec.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS);
  for (let attempt = 1; ; attempt++) {
    const r = (await runCommand(sb, spec.ready!, { timeoutMs: 30_000 })) as CommandResult;
    if (r.exitCode === 0) {
      progress({ phase: 'ready', message: `ready after ${attempt} ${attempt === 1 ? 'check' : 'checks'}` });
      return;
    }
    if (ended) throw new CladeError('bad_request', `the start command exited with code ${ended.exitCode} before the ready command succeeded; its output is in ${START_LOG}:\n${await startLogTail(sb)}`);
    if (Date.now() > deadline) throw new CladeError('timeout', `the ready command did not succeed within ${spec.readyTimeoutMs ?? DEFAULT_READY_TIMEOUT_MS} ms (last exit code ${r.exitCode}); the start command's output:\n${await startLogTail(sb)}`);
    if (attempt === 1 || attempt % 20 === 0) progress({ phase: 'ready', message: `waiting: ${spec.ready} exited ${r.exitCode}` });
    await new Promise((res) => setTimeout(res, READY_POLL_MS));
  }
}

async function startLogTail(sb: LiveSandbox): Promise<string> {
  try {
    return ((await runCommand(sb, ['tail', '-c', '2000', START_LOG], { timeoutMs: 10_000 })) as CommandResult).stdout;
  } catch {
    return '(unreadable)';
  }
}

