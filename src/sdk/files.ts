export { agentFileOps, Files, guestPath, MAX_READ_BYTES, type EntryInfo, type FileOps, type WriteInfo } from '../core/files.js';
