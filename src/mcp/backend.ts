import type { CommandResult } from '../core/commands.js';
import type { EntryInfo } from '../core/files.js';
import type { CodeResult } from '../core/interpreter.js';
import type { NetworkOptions, PortMapping } from '../core/manager.js';

/** A sandbox as the MCP tools describe it. */
export type SandboxSummary = { sandboxId: string; parentId?: string; snapshotTag?: string; startedAt?: string; expiresAt?: string | null; ports?: PortMapping[] };
/** What create_sandbox asks for. */
export type CreateOptions = { image?: string; template?: string; env?: Record<string, string>; timeoutMs?: number; network?: NetworkOptions };
/** One child of a fork or a start from a snapshot: its id, or why it failed. */
export type ChildOutcome = { sandboxId: string } | { error: string };

/**
 * What the MCP tools do, whoever runs the sandboxes: the daemon's own
 * registry (the daemon's MCP endpoint), or the SDK, against a daemon or in
 * this process (`clade mcp` over stdio).
 */
export interface McpBackend {
  /** Where sandboxes run, for the server's instructions. */
  readonly where: string;
  create(opts: CreateOptions): Promise<SandboxSummary>;
  run(sandboxId: string, command: string, opts: { timeoutMs?: number; cwd?: string; env?: Record<string, string> }): Promise<CommandResult>;
  runCode(sandboxId: string, code: string, opts: { timeoutMs?: number }): Promise<CodeResult>;
  readFile(sandboxId: string, path: string, maxBytes: number): Promise<Uint8Array>;
  writeFile(sandboxId: string, path: string, data: Uint8Array): Promise<void>;
  listFiles(sandboxId: string, path: string): Promise<EntryInfo[]>;
  fork(sandboxId: string, count: number, timeoutMs?: number): Promise<ChildOutcome[]>;
  snapshot(sandboxId: string, tag: string): Promise<{ tag: string; createdAt?: string }>;
  fromSnapshot(tag: string, count: number, timeoutMs?: number): Promise<ChildOutcome[]>;
  list(): Promise<SandboxSummary[]>;
  kill(sandboxId: string): Promise<void>;
}
