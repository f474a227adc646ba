import { buildImage, type ImageListing, type ImageManifest, type ImageRecipe, listImages, removeImage } from '../core/images.js';
import type { ProgressEvent } from '../util/progress.js';
import { longOperation } from './long-op.js';
import { daemonClient, type DaemonOptions } from './remote.js';

export type { ImageListing, ImageManifest, ImageRecipe } from '../core/images.js';
export type ImageBuildResult = ImageManifest & { cached: boolean; seconds: number };

/**
 * Guest images: clade's base plus your Debian packages, host files and env,
 * content-addressed (the same recipe and package versions are a cache hit).
 * Built in this process, or by a daemon when one is named; copy sources are
 * paths on the machine that builds, so a daemon takes them on its unix socket
 * only (over TCP they would read the daemon host's files).
 */
export const Image = {
  async build(recipe: ImageRecipe, opts: { onProgress?: (e: ProgressEvent) => void; force?: boolean } & DaemonOptions = {}): Promise<ImageBuildResult> {
    const client = daemonClient(opts);
    if (client) return longOperation<ImageBuildResult>(client, '/v1/images', { ...recipe, ...(opts.force ? { force: true } : {}) }, opts.onProgress);
    const r = await buildImage({ ...recipe, ...(opts.onProgress ? { progress: opts.onProgress } : {}), ...(opts.force ? { force: true } : {}) });
    return { ...r.manifest, cached: r.cached, seconds: r.seconds };
  },

  async list(opts: DaemonOptions = {}): Promise<ImageListing[]> {
    const client = daemonClient(opts);
    return client ? client.json<ImageListing[]>('GET', '/v1/images') : listImages();
  },

  /** Removes an image by name or digest. */
  async remove(ref: string, opts: DaemonOptions = {}): Promise<{ digest: string; names: string[] }> {
    const client = daemonClient(opts);
    return client ? client.json('DELETE', `/v1/images/${encodeURIComponent(ref)}`) : removeImage(ref);
  },
};
