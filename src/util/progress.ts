/** Progress of a long operation (image build, bulk fork), for CLIs and logs. */
export type ProgressEvent = { phase: string; message: string; done?: number; total?: number };
export type ProgressFn = (event: ProgressEvent) => void;
export const noProgress: ProgressFn = () => undefined;
