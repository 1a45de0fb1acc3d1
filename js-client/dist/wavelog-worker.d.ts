/*! wavelog-worker client 0.1.0 | built from js-client/src by build.mjs: do not edit */
// Type declarations for the wavelog-worker browser client (ES module and classic script).

/** The transport a subscription uses. */
export type Transport = "websocket" | "sse";

/** A subscription's state, reported through onStatus. */
export type State = "connecting" | "open" | "reconnecting" | "refused" | "closed";

/** What onPush learns besides the payload. */
export interface PushMeta {
  /** The event id, `<epoch>-<seq>`. */
  id: string | null;
  transport: Transport;
  topic: string;
}

export interface SubscribeOptions<P = unknown> {
  /** ws(s):// or http(s):// base of the worker; the other scheme is derived. Default: window.WavelogWorker.url. */
  url?: string;
  topic: string;
  /** A token from the backend. At least one of token and getToken is required. */
  token?: string;
  /** Returns a fresh token: called when there is none, when it expires, and once after a refusal. */
  getToken?: () => string | Promise<string>;
  /** Default "auto": WebSocket, falling back to SSE for the page's lifetime when it can't get through. */
  transport?: "auto" | Transport;
  onPush?(payload: P, meta: PushMeta): void;
  /** Events may have been missed: fetch the current state again. */
  onResync?(): void;
  onStatus?(state: State): void;
  /** Elect one tab of this origin to hold the connection and relay to the others. */
  shareAcrossTabs?: boolean;
  /** ms for a WebSocket to see auth_ok / an EventSource to open (default 6000). */
  connectTimeout?: number;
  /** Reconnect backoff bounds in ms (defaults 500 and 30000). */
  minDelay?: number;
  maxDelay?: number;
  /** Backoff growth base in ms (default 1000). */
  baseDelay?: number;
  /** ms after which an open connection counts as stable and the backoff restarts (default 10000). */
  stableAfter?: number;
  /** Log state changes with console.debug (never tokens). */
  debug?: boolean;
}

export interface Subscription {
  readonly topic: string;
  readonly state: State | null;
  close(): void;
}

/** What the client touches in the page; every field can be replaced (tests, Node). */
export interface ClientEnv {
  WebSocket?: unknown;
  EventSource?: unknown;
  fetch?: (url: string, init?: object) => Promise<{ status: number; body?: unknown }>;
  AbortController?: unknown;
  BroadcastChannel?: unknown;
  locks?: unknown;
  sessionStorage?: Storage | null;
  localStorage?: Storage | null;
  window?: unknown;
  document?: unknown;
  location?: { href: string };
  console?: Pick<Console, "debug" | "warn">;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
  now?: () => number;
  random?: () => number;
  reportError?: (error: unknown) => void;
  defaultUrl?: () => string | undefined;
}

export interface WavelogWorkerApi {
  subscribe<P = unknown>(options: SubscribeOptions<P>): Subscription;
  readonly version: string;
  createClient(env?: ClientEnv): WavelogWorkerApi;
}

export declare const VERSION: string;
export declare function createClient(env?: ClientEnv): WavelogWorkerApi;
/** Reconnect delay for a 0-based attempt: full jitter within [minDelay, min(maxDelay, baseDelay * 2^attempt)]. */
export declare function backoffDelay(
  attempt: number,
  random?: () => number,
  opts?: { minDelay?: number; baseDelay?: number; maxDelay?: number },
): number;
export declare function parseEventId(id: string): { epoch: string; seq: number } | null;
export declare function isNewer(id: string, last: string | null | undefined): boolean;
export declare function deriveUrls(url: string, base?: string): { ws: string; http: string; key: string };
export declare function tokenExpiry(token: string): number | null;

export declare const WavelogWorker: WavelogWorkerApi;
export default WavelogWorker;

declare global {
  interface Window {
    /** Set by the classic script; a config object set before it ({ url }) is kept and extended. */
    WavelogWorker: WavelogWorkerApi & { url?: string; [key: string]: unknown };
  }
}
