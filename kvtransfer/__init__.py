"""The KV handoff between the tiers.

    decode instance                                    prefill instance
    ---------------                                    ----------------
    admit request, take prompt blocks
    LeaseTable.create(transfer_id, block ids)
    Prefill(request, destination) --------------------> compute chunk 1
                                                        compute chunk 2 | push chunk-1 blocks
    KvTransfer.PushBlocks  <--- begin, blocks... ------ compute chunk 3 | push chunk-2 blocks
      lease: check layout, write blocks                 sample first token
           <--- complete(first token) ----------------- 
      lease COMPLETE, ack  ---------------------------> free its blocks
    <-------------------------------------------------- PrefillResponse
    request joins the running batch

Modules: `segments` (blocks <-> bounded protobuf segments), `lease` (receiver-side leases),
`receiver` (the KvTransfer gRPC service), `sender` (the transport interface and its gRPC/TCP
implementation; a same-host GPU transport implements the same `KvTransport` protocol).
"""
