import { CladeError, errorMessage } from '../util/errors.js';
import type { ProgressEvent } from '../util/progress.js';

/** Prints a result: JSON for scripts (--json), text for people. */
export function emit(json: boolean, value: unknown, text: () => string): void {
  if (json) process.stdout.write(JSON.stringify(value, null, 2) + '\n');
  else {
    const t = text();
    if (t) process.stdout.write(t.endsWith('\n') ? t : t + '\n');
  }
}

/** Progress goes to stderr so stdout stays clean for --json. */
export function progressPrinter(json: boolean): (e: ProgressEvent) => void {
  return (e) => {
    if (json) return;
    const count = e.total ? ` [${e.done}/${e.total}]` : '';
    process.stderr.write(`${e.phase}${count}: ${e.message}\n`);
  };
}

export function reportError(err: unknown, json: boolean): number {
  const code = err instanceof CladeError ? err.code : 'internal';
  const message = errorMessage(err);
  if (json) process.stdout.write(JSON.stringify({ error: { code, message } }, null, 2) + '\n');
  else process.stderr.write(`clade: ${message}\n`);
  return 1;
}

export function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}

export function mib(bytes: number): string {
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}
