import { defaultManager, killSandboxesOnExit } from '../core/default.js';
import { createTemplate } from '../core/templates.js';
import { listTemplates, removeTemplate, type TemplateInfo, type TemplateSpec } from '../core/template-store.js';
import type { ProgressEvent } from '../util/progress.js';
import { longOperation } from './long-op.js';
import { daemonClient, type DaemonOptions } from './remote.js';

export type { TemplateInfo, TemplateSpec } from '../core/template-store.js';

/**
 * Templates: a sandbox set up once (commands, Python code, a started process
 * that passed its ready check) and saved, so that `Sandbox.create({ template })`
 * starts warm and already serving. In this process, or in a daemon when one is
 * named (`daemon` option or CLADE_DAEMON).
 */
export const Template = {
  /** Boots, runs the setup, starts and waits for ready, snapshots. `onProgress` gets setup output as it comes. */
  async create(spec: TemplateSpec, opts: { onProgress?: (e: ProgressEvent) => void } & DaemonOptions = {}): Promise<TemplateInfo> {
    const client = daemonClient(opts);
    if (client) return longOperation<TemplateInfo>(client, '/v1/templates', spec, opts.onProgress);
    killSandboxesOnExit();
    return createTemplate(defaultManager(), spec, opts.onProgress);
  },

  async list(opts: DaemonOptions = {}): Promise<TemplateInfo[]> {
    const client = daemonClient(opts);
    return client ? client.json<TemplateInfo[]>('GET', '/v1/templates') : listTemplates();
  },

  /** Removes the template and its snapshot. */
  async remove(name: string, opts: DaemonOptions = {}): Promise<void> {
    const client = daemonClient(opts);
    if (client) await client.json('DELETE', `/v1/templates/${encodeURIComponent(name)}`);
    else removeTemplate(name);
  },
};
