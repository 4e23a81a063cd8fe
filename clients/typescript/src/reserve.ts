// A small client of the inventory service, typed only by what openapi-typescript generates from
// the committed docs/openapi.json (generated/api.d.ts). It is compiled, never run, by
// tests/api/openapi.rs: if the document changes in a way that breaks this code (a path, a
// parameter, a field or a problem code renamed or removed), `tsc --strict` fails and so does the
// test.
//
// It does what an order service does: set up a warehouse, a SKU and some stock, then hold stock
// for an order with an Idempotency-Key, and tell a held reservation from a refusal.

import createClient from "openapi-fetch";
import type { components, paths } from "../generated/api";

type Schemas = components["schemas"];
export type Reservation = Schemas["Reservation"];
export type ReserveBody = Schemas["ReserveBody"];
/** The body of the 409 answer of POST /v1/reservations (application/problem+json). */
export type Conflict =
  paths["/v1/reservations"]["post"]["responses"][409]["content"]["application/problem+json"];
export type Problem = Schemas["Problem"];
export type ProblemCode = Schemas["ProblemCode"];
/** The `Idempotency-Key` header, described once by the document (`components/parameters`). */
export type IdempotencyKey = components["parameters"]["IdempotencyKey"];

/** The headers that make a POST safe to retry. */
function idempotent(key: IdempotencyKey): { "Idempotency-Key": IdempotencyKey } {
  return { "Idempotency-Key": key };
}

export type Client = ReturnType<typeof inventoryClient>;

/** `apiKey` as minted by `inventory keys new --role …`; not needed on loopback without keys. */
export function inventoryClient(baseUrl: string, apiKey?: string) {
  return createClient<paths>({
    baseUrl,
    headers: apiKey === undefined ? {} : { Authorization: `Bearer ${apiKey}` },
  });
}

export class ProblemError extends Error {
  constructor(
    readonly what: string,
    readonly problem: Problem,
  ) {
    super(`${what}: ${problem.status} ${problem.code}: ${problem.detail} (request ${problem.request_id})`);
  }
}

/** What a reservation attempt came to. */
export type Outcome =
  | { kind: "held"; reservation: Reservation; allocations: string[] }
  | { kind: "short"; lines: { sku: string; requested: number; available: number }[] }
  | { kind: "duplicate"; existing: string | null };

/** Creates (or updates) warehouse BER and SKU TSHIRT, and receives `quantity` units of it there. */
export async function stockUp(client: Client, quantity: number): Promise<void> {
  const warehouse = await client.PUT("/v1/warehouses/{code}", {
    params: { path: { code: "BER" } },
    // `satisfies`: openapi-fetch infers the body generically, which lets unknown fields through;
    // checked against the schema, a field the document no longer has is a compile error.
    body: { name: "Berlin", region: "eu-central", priority: 1 } satisfies Schemas["WarehouseBody"],
  });
  if (warehouse.error !== undefined) throw new ProblemError("PUT warehouse", warehouse.error);
  const created: boolean = warehouse.response.status === 201;
  const active: boolean = warehouse.data.active;
  console.log(`warehouse ${warehouse.data.code} (${created ? "created" : "updated"}, active: ${active})`);

  const sku = await client.PUT("/v1/skus/{sku}", {
    params: { path: { sku: "TSHIRT" } },
    body: { name: "T-shirt", backorder_limit: 0 } satisfies Schemas["SkuBody"],
  });
  if (sku.error !== undefined) throw new ProblemError("PUT sku", sku.error);
  const backorderLimit: number = sku.data.backorder_limit;
  console.log(`sku ${sku.data.sku} (backorder limit ${backorderLimit})`);

  const received = await client.POST("/v1/stock/receive", {
    headers: idempotent(`receive-TSHIRT-BER-${quantity}`),
    body: { sku: "TSHIRT", warehouse: "BER", quantity, reference: "PO-1" } satisfies Schemas["ReceiveBody"],
  });
  if (received.error !== undefined) throw new ProblemError("receive", received.error);
}

/**
 * Holds `quantity` T-shirts for `orderId` for 15 minutes. The Idempotency-Key makes a retry
 * (after a timeout, say) safe: the service replays its first answer instead of holding twice.
 */
export async function reserve(client: Client, orderId: string, quantity: number): Promise<Outcome> {
  // Annotated (like the bodies above), so that a field the document no longer has is an error.
  const body: ReserveBody = {
    order_id: orderId,
    lines: [{ sku: "TSHIRT", quantity }],
    ttl_seconds: 900,
  };
  const { data, error, response } = await client.POST("/v1/reservations", {
    headers: idempotent(`reserve-${orderId}`),
    body,
  });

  if (error === undefined) {
    // The typed 201 answer.
    const reservation: Reservation = data;
    const status: string = reservation.status;
    const allocations = reservation.lines.flatMap((line) =>
      line.allocations.map((a) => `${line.sku} × ${a.quantity} from ${a.warehouse} (held ${a.held})`),
    );
    console.log(`reservation ${reservation.id} is ${status}, expires ${reservation.expires_at}`);
    return { kind: "held", reservation, allocations };
  }

  if (response.status === 409) {
    const conflict: Conflict = error;
    const code: ProblemCode = conflict.code;
    switch (code) {
      case "insufficient_stock":
        return {
          kind: "short",
          lines: (conflict.lines ?? []).map(({ sku, requested, available }) => ({ sku, requested, available })),
        };
      case "duplicate_order":
        return { kind: "duplicate", existing: conflict.reservation_id ?? null };
      default:
        break;
    }
  }
  throw new ProblemError("reserve", error);
}

/** The whole story: stock up 5, hold 2 for one order, then ask for 10 for another. */
export async function example(baseUrl: string, apiKey?: string): Promise<void> {
  const client = inventoryClient(baseUrl, apiKey);
  await stockUp(client, 5);
  for (const [orderId, quantity] of [
    ["order-1001", 2],
    ["order-1002", 10],
  ] as const) {
    const outcome = await reserve(client, orderId, quantity);
    switch (outcome.kind) {
      case "held":
        console.log(`${orderId}: held`, outcome.allocations);
        break;
      case "short":
        console.log(`${orderId}: not enough stock`, outcome.lines);
        break;
      case "duplicate":
        console.log(`${orderId}: already reserved as ${outcome.existing}`);
        break;
    }
  }
}
