//! The OpenAPI description names every route the server answers.

#[test]
fn every_route_is_documented() {
    let spec = include_str!("../../../schemas/openapi.yaml");
    let routes = [
        "/click",
        "/postback",
        "/success.jpg",
        "/success.php",
        "/track.js",
        "/health",
        "/ready",
        "/metrics",
        "/3.0/admin/advertiser",
        "/3.0/admin/advertiser/{id}",
        "/3.0/admin/advertisers",
        "/3.0/admin/offer",
        "/3.0/admin/offer/{id}",
        "/3.0/offers",
        "/3.0/offer/{id}",
        "/3.0/admin/partner",
        "/3.0/admin/partner/{id}",
        "/3.0/admin/partners",
        "/3.0/partner/postback",
        "/3.0/partner/postback/{id}",
        "/3.0/partner/postback/{id}/remove",
        "/3.0/admin/postbacks",
        "/3.0/stats/serverpostbacks",
        "/3.0/stats/serverpostbacks/summary",
        "/3.0/stats/serverpostbacks/live",
        "/3.0/stats/serverpostbacks/{id}/explanation",
        "/3.0/stats/serverpostbacks/csv",
        "/3.0/stats/conversions",
        "/3.0/stats/affiliatepostbacks",
        "/3.0/admin/affiliatepostbacks/resend",
        "/3.0/partner/postback/{id}/test",
    ];
    for route in routes {
        assert!(
            spec.contains(&format!("\n  {route}:\n")),
            "{route} is not in schemas/openapi.yaml"
        );
    }
    let documented = spec
        .lines()
        .filter(|l| l.starts_with("  /") && l.ends_with(':'))
        .count();
    assert_eq!(
        documented,
        routes.len(),
        "a documented path is not in this list"
    );
}
