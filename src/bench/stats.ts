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
