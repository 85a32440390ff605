// Challenge-response authentication with the cluster's shared secret
// (docs/protocol.md, "Handshake"). The secret never crosses the wire: each
// side sends HMAC-SHA256(secret, role | cluster | client nonce | server nonce).
#pragma once

#include <string>
#include <string_view>

namespace replica::transport {

inline constexpr size_t kNonceSize = 32;

// kNonceSize bytes from the OS's cryptographic generator.
std::string RandomNonce();
// role is "replica/client" or "replica/server"; fields are length-prefixed so
// no two different inputs hash alike.
std::string AuthProof(std::string_view secret, std::string_view role, std::string_view cluster,
                      std::string_view client_nonce, std::string_view server_nonce);
// Constant-time comparison.
bool ProofEquals(std::string_view a, std::string_view b);

}  // namespace replica::transport
