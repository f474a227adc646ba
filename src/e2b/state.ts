import { randomBytes } from 'node:crypto';
import type { LiveSandbox } from '../core/sandbox.js';
import type { SandboxRegistry } from '../api/registry.js';
import { CladeError } from '../util/errors.js';

/** The envd version clade reports: the features the clients gate on it that clade serves (docs/e2b.md). */
export const ENVD_VERSION = '0.6.4';
/** The id of the default code context: the sandbox's own interpreter, the one clade's runCode uses. */
export const DEFAULT_CONTEXT_ID = 'default';

/** Per-sandbox tables of the envd services (processes, watchers): dropped with the sandbox. */
export type Droppable = { dropAll(): void };

export type CodeContext = { id: string; language: 'python'; cwd: string; executions: number };

/**
 * What an E2B client knows about a sandbox that clade itself does not keep:
 * the template name it was created from, its metadata, the per-sandbox
 * access tokens, the processes and code contexts made through E2B calls.
 * Made on first use for any sandbox of the daemon (one created through
 * clade's own API too), and kept in memory: after a daemon restart, clients
 * get new tokens with `Sandbox.connect`.
 */
export class E2bSandbox {
  readonly envdAccessToken = randomBytes(24).toString('base64url');
  readonly trafficAccessToken = randomBytes(24).toString('base64url');
  metadata: Record<string, string> = {};
  readonly contexts = new Map<string, CodeContext>();
  processes?: Droppable;
  watchers?: Droppable;

  constructor(
    readonly sandboxId: string,
    public templateId: string,
  ) {
    this.contexts.set(DEFAULT_CONTEXT_ID, { id: DEFAULT_CONTEXT_ID, language: 'python', cwd: '/root', executions: 0 });
  }
}

/** The E2B state of the daemon's sandboxes, kept in step with the registry. */
export class E2bState {
  private readonly byId = new Map<string, E2bSandbox>();

  constructor(readonly registry: SandboxRegistry) {}

  /** The live sandbox and its E2B state; `not_found` if the daemon has no such sandbox. */
  get(id: string): { live: LiveSandbox; e2b: E2bSandbox } {
    let live: LiveSandbox;
    try {
      live = this.registry.get(id);
    } catch (err) {
      this.forget(id);
      throw err;
    }
    if (!live.alive) {
      this.forget(id);
      throw new CladeError('not_found', `sandbox ${id} is not running any more`);
    }
    let e2b = this.byId.get(id);
    if (!e2b) {
      e2b = new E2bSandbox(id, live.snapshotTag ?? 'base');
      this.byId.set(id, e2b);
    }
    return { live, e2b };
  }

  /** Only if it exists already (listing sandboxes does not make state for all of them). */
  peek(id: string): E2bSandbox | undefined {
    return this.byId.get(id);
  }

  /** State for a sandbox just made by an E2B call. */
  adopt(id: string, templateId: string, metadata: Record<string, string>): E2bSandbox {
    const e2b = new E2bSandbox(id, templateId);
    e2b.metadata = { ...metadata };
    this.byId.set(id, e2b);
    return e2b;
  }

  /** A fork's child: the parent's template, metadata and code contexts (their interpreters came along in the guest). */
  inherit(childId: string, parent: E2bSandbox): E2bSandbox {
    const e2b = this.adopt(childId, parent.templateId, parent.metadata);
    for (const c of parent.contexts.values()) e2b.contexts.set(c.id, { ...c });
    return e2b;
  }

  forget(id: string): void {
    const e2b = this.byId.get(id);
    if (!e2b) return;
    this.byId.delete(id);
    e2b.processes?.dropAll();
    e2b.watchers?.dropAll();
  }

  /** Drops the state of sandboxes that are gone (deleted through clade's API, expired). */
  sweep(): void {
    for (const id of [...this.byId.keys()]) {
      try {
        if (!this.registry.get(id).alive) this.forget(id);
      } catch {
        this.forget(id);
      }
    }
  }

  /** The sandbox whose envd token signed this file URL (header-less upload and download links). */
  findBy(test: (e2b: E2bSandbox) => boolean): E2bSandbox | undefined {
    for (const e2b of this.byId.values()) if (test(e2b)) return e2b;
    return undefined;
  }
}
