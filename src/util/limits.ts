/** Most children one fork (or one start from a snapshot, or one pool) may ask for. */
export const MAX_FORK_COUNT = 1000;
