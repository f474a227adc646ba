import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { openApiDocument, OPENAPI_PATH } from '../../src/api/openapi.js';

describe('OpenAPI document', () => {
  it('docs/openapi.json matches the route schemas (regenerate with `npm run openapi`)', async () => {
    const doc = await openApiDocument();
    expect(readFileSync(OPENAPI_PATH(), 'utf8')).toBe(doc);
    const paths = Object.keys((JSON.parse(doc) as { paths: Record<string, unknown> }).paths);
    expect(paths).toEqual(expect.arrayContaining(['/v1/sandboxes', '/v1/sandboxes/{id}/exec', '/v1/sandboxes/{id}/fork', '/v1/snapshots/{tag}/start']));
  });
});
