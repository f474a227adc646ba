import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cladeHome } from '../util/home.js';

/** Percentile by nearest rank on a sorted copy; p in [0, 100]. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * sorted.length) - 1;
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank))]!;
}

export type Summary = { n: number; median: number; p90: number; min: number; max: number };

export function summarize(values: number[]): Summary {
  return { n: values.length, median: percentile(values, 50), p90: percentile(values, 90), min: Math.min(...values), max: Math.max(...values) };
}

/** Writes a benchmark's result as JSON under the clade home's bench/ and records where in `jsonPath`. */
export function saveBenchResult<T extends { benchmark: string; date: string; jsonPath?: string }>(result: T): T {
  const dir = join(cladeHome(), 'bench');
  mkdirSync(dir, { recursive: true });
  result.jsonPath = join(dir, `${result.benchmark}-${result.date.replace(/[:.]/g, '-')}.json`);
  writeFileSync(result.jsonPath, JSON.stringify(result, null, 2) + '\n');
  return result;
}
