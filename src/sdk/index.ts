export { Sandbox, type SandboxCreateOptions, type SandboxInfo, type SnapshotInfo } from './sandbox.js';
export { type CommandHandle, type CommandOptions, type CommandResult } from './commands.js';
export { type EntryInfo, type WriteInfo } from './files.js';
export { CladeError, type CladeErrorCode } from '../util/errors.js';
export { Template, type TemplateInfo, type TemplateSpec } from './templates.js';
export { Image, type ImageBuildResult, type ImageListing, type ImageRecipe } from './images.js';
