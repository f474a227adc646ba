import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultManager } from '../../src/core/default.js';
import { Sandbox } from '../../src/sdk/index.js';
import { leftNothing } from '../helpers/leaks.js';

// runCode's request boundaries against user code that tries to forge them, in a
// real guest: one sandbox for the whole file.
let sb: Sandbox;
beforeAll(async () => {
  sb = await Sandbox.create();
});
afterAll(async () => {
  const id = sb?.sandboxId;
  await sb?.kill();
  if (id) expect(leftNothing(id)).toBe(true);
});

/** The nonce of the request in flight, read from the host's side of the session. */
async function nonceInFlight(): Promise<string> {
  const live = defaultManager().get(sb.sandboxId);
  for (let i = 0; i < 200; i++) {
    const current = (live.interpreter as unknown as { current?: { nonce: string } } | undefined)?.current;
    if (current) return current.nonce;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error('no runCode request in flight');
}

/** Python processes of the interpreter, as `pid ppid CapEff` lines. */
async function interpreterProcesses(): Promise<string[]> {
  const r = await sb.commands.run(String.raw`for p in /proc/[0-9]*; do
  if [ "$(head -c 7 $p/cmdline 2>/dev/null)" = python3 ] && grep -q interpreter.py $p/cmdline; then
    echo "$(basename $p) $(awk '/^PPid:/ {print $2} /^CapEff:/ {print $2}' $p/status | tr '\n' ' ')"
  fi
done`);
  return r.stdout.trim().split('\n').filter(Boolean);
}

// Searches everything user code can reach for the nonce, tries every door to the
// supervisor's memory and descriptors, and prints a forged marker for each candidate.
const HUNT = String.raw`
import ctypes, gc, json, os, re, sys
found = set()
HEX = re.compile(r'[0-9a-f]{16,}')
def scan(v, depth=0):
    if isinstance(v, str):
        found.update(HEX.findall(v))
    elif isinstance(v, (bytes, bytearray, memoryview)):
        found.update(m.decode() for m in re.findall(rb'[0-9a-f]{16,}', bytes(v)))
    elif depth < 2 and isinstance(v, dict):
        for k, x in list(v.items()):
            scan(k, depth + 1); scan(x, depth + 1)
    elif depth < 2 and isinstance(v, (list, tuple, set, frozenset)):
        for x in list(v):
            scan(x, depth + 1)
    elif depth < 2 and hasattr(v, '__dict__') and isinstance(getattr(v, '__dict__', None), dict):
        scan(vars(v), depth + 1)
for o in gc.get_objects():
    try:
        scan(o)
    except Exception:
        pass
f = sys._getframe()
while f is not None:
    scan(dict(f.f_locals)); scan(f.f_globals)
    f = f.f_back
for name in os.listdir('/proc/self'):
    try:
        scan(open('/proc/self/' + name, 'rb').read(1 << 20))
    except Exception:
        pass
ppid = os.getppid()
doors = {}
def door(name, fn):
    try:
        got = fn()
        doors[name] = 'open'
        scan(got)
    except Exception as e:
        doors[name] = type(e).__name__
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    if fn(*args) == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
door('mem', lambda: open('/proc/%d/mem' % ppid, 'rb').read(1))
door('maps', lambda: open('/proc/%d/maps' % ppid).read())
door('environ', lambda: open('/proc/%d/environ' % ppid, 'rb').read())
door('stdin', lambda: os.read(os.open('/proc/%d/fd/0' % ppid, os.O_RDONLY | os.O_NONBLOCK), 1 << 16))
door('stdout', lambda: os.open('/proc/%d/fd/1' % ppid, os.O_WRONLY))
def agent_fds():  # the agent's port and pipes (listing them is allowed, opening is not)
    fds = os.listdir('/proc/1/fd')
    shut = 0
    for n in fds:
        try:
            os.open('/proc/1/fd/' + n, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            shut += 1
    if shut < len(fds):
        return 'opened %d of %d' % (len(fds) - shut, len(fds))
    raise PermissionError('none of %d opened' % len(fds))
door('agent_fds', agent_fds)
door('ptrace', lambda: call(libc.ptrace, 16, ppid, None, None))
door('kcore', lambda: open('/proc/kcore', 'rb').read(1))
door('devmem', lambda: open('/dev/mem', 'rb').read(1))
class IOVec(ctypes.Structure):
    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
buf = ctypes.create_string_buffer(64)
door('process_vm_readv', lambda: call(libc.process_vm_readv, ppid, ctypes.byref(IOVec(ctypes.addressof(buf), 64)), 1, ctypes.byref(IOVec(0x400000, 64)), 1, 0))
for c in sorted(found):
    print('\x1eclade:%s:%s' % (c, json.dumps({'id': 1, 'value': "'forged'"})))
    print('\x1eclade:%s:end' % c, file=sys.stderr)
print('\x1eclade:%s:{"value": "\'forged\'"}' % os.urandom(12).hex())
'real:' + json.dumps({'found': sorted(found), 'doors': doors})
`;

describe('runCode markers', () => {
  it('cannot be forged by user code that hunts for the nonce', async () => {
    expect((await sb.runCode('warm = 1')).error).toBeUndefined();
    const running = sb.runCode(HUNT, { timeoutMs: 120_000 });
    const nonce = await nonceInFlight();
    const r = await running;
    expect(r.error).toBeUndefined();
    expect(r.value).toMatch(/^'real:/);
    const report = JSON.parse(r.value!.slice(6, -1)) as { found: string[]; doors: Record<string, string> };
    expect(report.found.length).toBeGreaterThan(0); // it did find hex strings (its own request's tag, module hashes...)
    expect(report.found.some((c) => c.includes(nonce))).toBe(false);
    for (const [door, outcome] of Object.entries(report.doors)) expect(`${door}: ${outcome}`).not.toBe(`${door}: open`);
    expect(r.stdout).toContain(`:{"id": 1, "value": "'forged'"}`);
    // The doors are shut by what the worker gave up, not absent: a command (full root) opens them.
    const sup = (await interpreterProcesses()).map((l) => l.split(' ')).find(([, ppid]) => ppid !== '1' && ppid !== undefined)?.[1];
    expect((await sb.commands.run(`head -c 1 /proc/${sup}/maps >/dev/null && echo readable`)).stdout).toBe('readable\n');
    expect((await sb.runCode('warm + 1')).value).toBe('2');
  });

  it('runs user code without the capabilities that read other processes; commands keep them', async () => {
    const eff = BigInt('0x' + (await sb.runCode("open('/proc/self/status').read().split('CapEff:')[1].split()[0]")).value!.slice(1, -1));
    for (const cap of [16n, 17n, 19n, 21n, 22n, 38n, 39n]) expect((eff >> cap) & 1n).toBe(0n);
    expect((eff >> 1n) & 1n).toBe(1n); // CAP_DAC_OVERRIDE: still root for files
    expect((await sb.runCode("import os; open('/etc/clade-root-check', 'w').write('x'); os.getuid()")).value).toBe('0');
    const cmd = await sb.commands.run("grep CapEff /proc/self/status | awk '{print $2}'");
    expect(BigInt('0x' + cmd.stdout.trim()) >> 19n & 1n).toBe(1n);
  });

  it('lets a forged completion end only its own request: its later output goes nowhere', async () => {
    // The worker's own tag and report pipe are within reach of user code: it can end its request early.
    const forge = String.raw`
import gc, json, os, sys, threading, time
worker = next(o for o in gc.get_objects() if type(o).__name__ == 'Worker')
f = sys._getframe()
while 'tag' not in f.f_locals:
    f = f.f_back
tag = f.f_locals['tag']
print('before the forgery')
os.write(worker.control, ('done %s %s\n' % ('0' * 32, json.dumps({'value': "'wrong tag'"}))).encode())
time.sleep(0.3)
os.write(worker.control, ('done %s %s\n' % (tag, json.dumps({'value': "'forged early'"}))).encode())
time.sleep(1.5)
print('LATE output of the forging request')
os.system('echo LATE output of its child')
'real end'
`;
    const r = await sb.runCode(forge);
    expect(r.value).toBe("'forged early'");
    expect(r.stdout).toBe('before the forgery\n');
    const next = await sb.runCode('print("next"); 41 + 1');
    expect(next).toMatchObject({ value: '42', stdout: 'next\n', stderr: '' });
    expect((await sb.runCode('"still"')).value).toBe("'still'");
  });

  it('caps a huge value and keeps serving', async () => {
    const r = await sb.runCode("'x' * (3 * 1024 * 1024)");
    expect(r.value!.length).toBeLessThan(1024 * 1024 + 100);
    expect(r.value).toMatch(/more characters left out\]$/);
  });

  it('ends with the worker: a worker that exits ends the interpreter, and the next call starts afresh', async () => {
    await sb.runCode('kept = 1');
    await expect(sb.runCode('import os; os._exit(3)')).rejects.toMatchObject({ code: 'killed' });
    expect((await sb.runCode("'kept' in dir()")).value).toBe('False');
  });

  it('kills worker and supervisor on a timeout, even a worker that left the process group', async () => {
    await expect(sb.runCode('import os, time; os.setsid(); time.sleep(60)', { timeoutMs: 1500 })).rejects.toMatchObject({ code: 'timeout' });
    let left: string[] = [];
    for (let i = 0; i < 50; i++) {
      left = await interpreterProcesses();
      if (left.length === 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(left).toEqual([]);
    expect((await sb.runCode('1 + 1')).value).toBe('2');
    expect(await interpreterProcesses()).toHaveLength(2);
  });
});
