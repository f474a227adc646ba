// What a forked clade-vmm child has written into its guest RAM, by owner inside
// the guest: the guest kernel, the Python interpreter, other processes, or pages
// the guest has freed again. For `clade bench vmm`, which runs as root inside the
// runner and as root in the guest (page frame numbers in pagemap need CAP_SYS_ADMIN).
//
// Host side: a page of guest RAM that the child maps exclusively (pagemap bit 56)
// is one it wrote since the fork (copy-on-write gave it its own copy), or one its
// parent and every sibling have since replaced with their own. With ten siblings
// alive, it is the child's own write. Its index in the mapping is the guest page
// frame number. Guest side: /proc/<pid>/pagemap of every process and
// /proc/kpageflags say who holds each frame now.
import { closeSync, openSync, readFileSync, readSync } from 'node:fs';
import type { Sandbox } from '../sdk/index.js';

const PAGE = 4096;

/** The mapping of exactly `ramBytes` bytes in the process: clade-vmm's guest RAM (the only one that size). */
function ramMapping(pid: number, ramBytes: number): bigint | undefined {
  for (const line of readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (m && BigInt(`0x${m[2]}`) - BigInt(`0x${m[1]}`) === BigInt(ramBytes)) return BigInt(`0x${m[1]}`);
  }
  return undefined;
}

/** Guest page frames the clade-vmm process `pid` holds privately: its guest's writes since the fork. */
export function privateGuestFrames(pid: number, ramBytes: number): number[] {
  const start = ramMapping(pid, ramBytes);
  if (start === undefined) throw new Error(`no guest RAM mapping of ${ramBytes} bytes in process ${pid}`);
  const pages = ramBytes / PAGE;
  const buf = Buffer.alloc(pages * 8);
  const fd = openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    readSync(fd, buf, 0, buf.length, Number((start / BigInt(PAGE)) * 8n));
  } finally {
    closeSync(fd);
  }
  const frames: number[] = [];
  for (let i = 0; i < pages; i++) {
    const entry = buf.readBigUInt64LE(i * 8);
    if ((entry >> 63n) & 1n && (entry >> 56n) & 1n) frames.push(i); // present, mapped exclusively
  }
  return frames;
}

/**
 * Runs in the guest: sorts the frames listed in argv[1] by owner, prints JSON {counts: {origin: pages}, kernelPages}.
 * Processes first (their page tables say which frames they map), then the kernel image's
 * sections (/proc/iomem), then the page's flags (/proc/kpageflags) for the rest.
 */
const CLASSIFY_PY = String.raw`
import bisect, json, os, struct, sys
frames = [int(x) for x in open(sys.argv[1]).read().split()]
want = set(frames)
owner = {}
for pid in os.listdir('/proc'):
    if not pid.isdigit() or pid == str(os.getpid()):
        continue
    try:
        cmd = open('/proc/%s/cmdline' % pid, 'rb').read()
        maps = open('/proc/%s/maps' % pid).read().splitlines()
        pm = open('/proc/%s/pagemap' % pid, 'rb')
    except OSError:
        continue
    if b'interpreter.py' in cmd:
        # The supervisor talks to the host; the worker (its child) runs the code.
        parent = open('/proc/%s/stat' % pid).read().rpartition(')')[2].split()[1]
        try:
            worker = b'interpreter.py' in open('/proc/%s/cmdline' % parent, 'rb').read()
        except OSError:
            worker = False
        who = 'interpreterWorker' if worker else 'interpreterSupervisor'
    else:
        who = 'agent' if pid == '1' else 'otherProcesses'
    with pm:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split('-'))
            # Python's objects live in the heap and anonymous mappings; a library's written pages are its data and bss.
            name = fields[5] if len(fields) > 5 else ''
            part = 'Stack' if name == '[stack]' else 'Heap' if name in ('', '[heap]') else 'Libraries'
            where = who + part if who.startswith('interpreter') else who
            if hi - lo > 1 << 30:
                continue
            try:
                pm.seek(lo // 4096 * 8)
                data = pm.read((hi - lo) // 4096 * 8)
            except OSError:
                continue
            for i in range(len(data) // 8):
                e = struct.unpack_from('<Q', data, i * 8)[0]
                if e >> 63 & 1 and (e & ((1 << 55) - 1)) in want:
                    owner.setdefault(e & ((1 << 55) - 1), where)
# The kernel image: "Kernel code", "Kernel rodata", "Kernel data", "Kernel bss" (nested in System RAM).
sections = []
for line in open('/proc/iomem'):
    span, _, name = line.strip().partition(' : ')
    if name.startswith('Kernel '):
        lo, hi = (int(x, 16) for x in span.split('-'))
        sections.append((lo // 4096, hi // 4096, 'kernel' + name.split()[1].capitalize()))
# Kernel image pages by the symbols they hold: virtual = _text + (physical - start of "Kernel code").
code = next((lo for lo, hi, name in sections if name == 'kernelCode'), None)
symbols = []
try:
    for line in open('/proc/kallsyms'):
        addr, kind, name = line.split()[:3]
        if kind in 'dDbBrR' and int(addr, 16):
            symbols.append((int(addr, 16), name))
    text = next(int(l.split()[0], 16) for l in open('/proc/kallsyms') if l.split()[2] == '_text')
except (OSError, StopIteration):
    text = None
symbols.sort()
def names(f):
    if code is None or text is None:
        return []
    lo = text + (f - code) * 4096
    i = bisect.bisect_right(symbols, (lo, '\uffff'))
    j = bisect.bisect_left(symbols, (lo + 4096, ''))
    return [n for a, n in symbols[max(i - 1, 0):j]]
flags = open('/proc/kpageflags', 'rb')
counts = {}
kernel_pages = []
for f in frames:
    origin = owner.get(f)
    if origin is None:
        origin = next((name for lo, hi, name in sections if lo <= f <= hi), None)
    if origin is None:
        flags.seek(f * 8)
        k = struct.unpack('<Q', flags.read(8))[0]
        bit = lambda n: k >> n & 1
        # slab, page table, buddy (free), anon, swap-backed LRU (tmpfs), LRU (page cache); the rest is other kernel memory
        origin = ('kernelSlab' if bit(7) else 'kernelPageTables' if bit(26) else 'freed' if bit(10) else 'otherProcesses' if bit(12)
                  else 'tmpfs' if bit(5) and bit(14) else 'pageCache' if bit(5) else 'kernelReserved' if bit(32) else 'kernelOther')
    counts[origin] = counts.get(origin, 0) + 1
    if origin in ('kernelData', 'kernelBss'):
        kernel_pages.append(origin[6:].lower() + ': ' + ' '.join(names(f)[:6]))
print(json.dumps({'counts': counts, 'kernelPages': kernel_pages}))
`;

export type PageOrigins = {
  /** Pages (4 KiB) by owner. */
  counts: Record<string, number>;
  /** For each page of the kernel image's data and bss: its section and the first symbols in it. */
  kernelPages: string[];
};

/** `frames` by owner inside the guest of `sb`; running the script writes a little more, so measure first. */
export async function framesByOrigin(sb: Sandbox, frames: number[]): Promise<PageOrigins> {
  await sb.files.write('/tmp/clade-bench-classify.py', CLASSIFY_PY);
  await sb.files.write('/tmp/clade-bench-frames', frames.join('\n'));
  const r = await sb.commands.run('python3 /tmp/clade-bench-classify.py /tmp/clade-bench-frames');
  if (r.exitCode !== 0) throw new Error(`classifying guest pages failed: ${r.stderr.slice(-500)}`);
  return JSON.parse(r.stdout) as PageOrigins;
}
